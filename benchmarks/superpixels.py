"""Superpixel and colour-cluster throughput and quality per setting on VOC-sized (500x375)
synthetic images.

`python -m benchmarks superpixels [--small] [--images 16] [--n-segments 100] [--clusters 8]
[--variants skimage,opencv,default] [--precompute-images 48]`.
A variant is `backend[/s<superpixel_scale>][/i<slic_iterations>]`; `default` is configs/base.py's
setting (data.superpixel_backend, superpixel_scale, slic_iterations). Per variant, in one
process: images/s of `ssr_jax.data.superpixels.compute` (SLIC) alone and with the colour
clustering (`color_clusters`, SGC's target regions; with the shared OpenCV Lab image where the
precompute shares it) that the precompute also runs, the clustering's ms per image, the ratio to
skimage, mean superpixel count (and the count requested), and the achievable segmentation
accuracy (ASA: pixel accuracy when every region takes its majority ground-truth class; 1.0 =
regions never straddle a class boundary) of the superpixels and of the clusters. Then the
precompute CLI's own throughput end to end (JPEG decode, SLIC, clusters, PNG writes) with its
default worker count (one process per usable core; process start-up included) on a temporary
VOC-layout folder; for the default also with 1 worker (the multi-process scaling) and the
projected minutes for VOC train_aug + val (12,031 images).
"""

import tempfile
import time

import numpy as np

from configs import base
from ssr_jax.data import parallel, superpixels, synthetic

VOC_IMAGES = 12_031  # VOC train_aug + val.


def add_args(p):
  p.add_argument("--images", type=int, default=16, help="500x375 images per variant")
  p.add_argument("--n-segments", type=int, default=100, help="per 320x320 area (§3.1)")
  p.add_argument("--clusters", type=int, default=8, help="data.color_clusters (K)")
  p.add_argument(
    "--variants", default="skimage,opencv,default", help="backend[/s<scale>][/i<iterations>]"
  )
  p.add_argument(
    "--precompute-images", type=int, default=48, help="images for the precompute CLI timing"
  )


def default_variant() -> str:
  d = base.get_config().data
  return variant_name(d.superpixel_backend, d.superpixel_scale, d.slic_iterations)


def variant_name(backend: str, scale: int, iterations: int) -> str:
  name = backend + (f"/s{scale}" if scale != 1 else "")
  return name + (f"/i{iterations}" if iterations != superpixels.ITERATIONS else "")


def parse_variant(name: str) -> dict:
  """ "opencv/s2/i5" -> {"backend": "opencv", "scale": 2, "iterations": 5}."""
  backend, *opts = name.split("/")
  out = {"backend": backend, "scale": 1, "iterations": superpixels.ITERATIONS}
  for o in opts:
    key = {"s": "scale", "i": "iterations"}.get(o[:1])
    if key is None or not o[1:].isdigit():
      raise ValueError(f"bad variant option {o!r} in {name!r}; use backend[/s<n>][/i<n>]")
    out[key] = int(o[1:])
  return out


def voc_like_images(num: int, *, height: int = 375, width: int = 500, seed: int = 0):
  """(images uint8 [N, H, W, 3], masks uint8 [N, H, W]) from the synthetic renderer."""
  size = max(height, width)
  data = synthetic.generate(num, size=size, seed=seed)
  return data["image"][:, :height, :width], data["mask"][:, :height, :width]


def asa(sp: np.ndarray, mask: np.ndarray) -> float:
  """Achievable segmentation accuracy of regions sp [H, W] against mask [H, W]."""
  joint = np.zeros((sp.max() + 1, 256), np.int64)
  np.add.at(joint, (sp.ravel(), mask.ravel()), 1)
  return float(joint.max(1).sum() / sp.size)


def _precompute(variant: str, num: int, height: int, width: int, args, workers: int = 0) -> dict:
  """The precompute CLI's images/s (workers 0 = its default) on a fresh VOC-layout folder."""
  from benchmarks.input import write_voc_like  # Late: that module imports this one.

  v = parse_variant(variant)
  with tempfile.TemporaryDirectory() as root:
    c = base.get_config().data
    c.name, c.root = "voc", root
    c.train_split = write_voc_like(root, num, height=height, width=width)
    c.superpixel_backend, c.n_segments = v["backend"], args.n_segments
    c.superpixel_scale, c.slic_iterations = v["scale"], v["iterations"]
    c.color_clusters = args.clusters
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    out = superpixels.precompute(c, c.train_split, workers=workers, progress=False)
    dt = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
  if out["problems"]:
    return {"problems": out["problems"][:3]}
  # CPU ms per image (this process and its finished workers, start-up included): what a busy
  # machine cannot distort; per-core throughput is 1000 / cpu_ms_per_image.
  return {
    "workers": workers or parallel.usable_cpus(),
    "images_per_s": num / dt,
    "cpu_ms_per_image": 1e3 * cpu / num,
  }


def _cpu_s() -> float:
  """User + system CPU seconds of this process and its waited-for children."""
  import resource

  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(args) -> dict:
  n = 4 if args.small else args.images
  h, w = (188, 250) if args.small else (375, 500)
  images, masks = voc_like_images(n, height=h, width=w)
  default = default_variant()
  names = list(dict.fromkeys(default if v == "default" else v for v in args.variants.split(",")))
  out = {
    "image_size": f"{w}x{h}",
    "images": n,
    "n_segments": args.n_segments,
    "requested_segments": superpixels.num_segments(h, w, args.n_segments),
    "clusters": args.clusters,
    "default": default,
  }
  base_ips = None
  for name in names:
    v = parse_variant(name)
    kw = dict(n_segments=args.n_segments, **v)
    shared = superpixels.shares_lab(v["backend"], v["scale"])
    try:
      superpixels.compute(images[0], **kw)  # Warm-up.
    except RuntimeError as e:
      out[name] = f"unavailable: {e}"
      continue
    t0 = time.perf_counter()
    labs = [superpixels.opencv_lab(im) if shared else None for im in images]
    maps = [superpixels.compute(im, lab=lab, **kw) for im, lab in zip(images, labs)]
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    clusters = [
      superpixels.color_clusters(im, m, num_clusters=args.clusters, lab=lab)
      for im, m, lab in zip(images, maps, labs)
    ]
    dc = time.perf_counter() - t0
    ips = n / dt
    base_ips = ips if name == "skimage" else base_ips
    out[name] = {
      "images_per_s": ips,
      "ms_per_image": 1e3 * dt / n,
      "cluster_ms_per_image": 1e3 * dc / n,
      "with_clusters_images_per_s": n / (dt + dc),
      "mean_segments": float(np.mean([m.max() + 1 for m in maps])),
      "asa": float(np.mean([asa(m, k) for m, k in zip(maps, masks)])),
      "cluster_asa": float(np.mean([asa(c, k) for c, k in zip(clusters, masks)])),
    }
  for name in names:
    if isinstance(out.get(name), dict) and base_ips:
      out[name]["speedup_vs_skimage"] = out[name]["images_per_s"] / base_ips
  num = 8 if args.small else args.precompute_images
  for name in names:
    if isinstance(out.get(name), dict):
      out[name]["precompute"] = _precompute(name, num, h, w, args)
  if isinstance(out.get(default), dict) and "images_per_s" in out[default]["precompute"]:
    ips = out[default]["precompute"]["images_per_s"]
    out[default]["precompute_1_worker"] = _precompute(default, num, h, w, args, workers=1)
    out["default_precompute_images_per_s"] = ips
    out["default_voc_minutes"] = VOC_IMAGES / ips / 60  # At this image size.
  return out
