"""Superpixel and colour-cluster throughput and quality per backend on VOC-sized (500x375)
synthetic images.

`python -m benchmarks superpixels [--small] [--images 16] [--n-segments 100] [--clusters 8]
[--precompute-images 48]`.
Per backend, in one process: images/s of `ssr_jax.data.superpixels.compute` (SLIC) alone and
with the colour clustering (`color_clusters`, SGC's target regions) that the precompute also
runs, the clustering's ms per image, the ratio to skimage, mean superpixel count, and the
achievable segmentation accuracy (ASA: pixel accuracy when every region takes its majority
ground-truth class; 1.0 = regions never straddle a class boundary) of the superpixels and of
the clusters. Then the precompute CLI's own throughput end to end (JPEG decode, SLIC, clusters,
PNG writes) with its default worker count (one process per usable core; process start-up
included) on a temporary VOC-layout folder.
"""

import tempfile
import time

import numpy as np

from configs import base
from ssr_jax.data import parallel, superpixels, synthetic


def add_args(p):
  p.add_argument("--images", type=int, default=16, help="500x375 images per backend")
  p.add_argument("--n-segments", type=int, default=100, help="per 320x320 area (§3.1)")
  p.add_argument("--clusters", type=int, default=8, help="data.color_clusters (K)")
  p.add_argument("--backends", default="skimage,opencv")
  p.add_argument(
    "--precompute-images", type=int, default=48, help="images for the precompute CLI timing"
  )


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


def _precompute(backend: str, num: int, height: int, width: int, args) -> dict:
  """The precompute CLI's images/s with its default workers on a fresh VOC-layout folder."""
  from benchmarks.input import write_voc_like  # Late: that module imports this one.

  with tempfile.TemporaryDirectory() as root:
    c = base.get_config().data
    c.name, c.root = "voc", root
    c.train_split = write_voc_like(root, num, height=height, width=width)
    c.superpixel_backend, c.n_segments = backend, args.n_segments
    c.color_clusters = args.clusters
    t0 = time.perf_counter()
    out = superpixels.precompute(c, c.train_split, progress=False)
    dt = time.perf_counter() - t0
  if out["problems"]:
    return {"problems": out["problems"][:3]}
  return {"workers": parallel.usable_cpus(), "images_per_s": num / dt}


def run(args) -> dict:
  n = 4 if args.small else args.images
  h, w = (188, 250) if args.small else (375, 500)
  images, masks = voc_like_images(n, height=h, width=w)
  out = {
    "image_size": f"{w}x{h}",
    "images": n,
    "n_segments": args.n_segments,
    "clusters": args.clusters,
  }
  base_ips = None
  for backend in args.backends.split(","):
    try:
      superpixels.compute(images[0], backend=backend, n_segments=args.n_segments)  # Warm-up.
    except RuntimeError as e:
      out[backend] = f"unavailable: {e}"
      continue
    t0 = time.perf_counter()
    maps = [superpixels.compute(im, backend=backend, n_segments=args.n_segments) for im in images]
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    clusters = [
      superpixels.color_clusters(im, m, num_clusters=args.clusters) for im, m in zip(images, maps)
    ]
    dc = time.perf_counter() - t0
    ips = n / dt
    base_ips = ips if backend == "skimage" else base_ips
    out[backend] = {
      "images_per_s": ips,
      "ms_per_image": 1e3 * dt / n,
      "cluster_ms_per_image": 1e3 * dc / n,
      "with_clusters_images_per_s": n / (dt + dc),
      "mean_segments": float(np.mean([m.max() + 1 for m in maps])),
      "asa": float(np.mean([asa(m, k) for m, k in zip(maps, masks)])),
      "cluster_asa": float(np.mean([asa(c, k) for c, k in zip(clusters, masks)])),
    }
  for backend in args.backends.split(","):
    if isinstance(out.get(backend), dict) and base_ips:
      out[backend]["speedup_vs_skimage"] = out[backend]["images_per_s"] / base_ips
  num = 8 if args.small else args.precompute_images
  for backend in args.backends.split(","):
    if isinstance(out.get(backend), dict):
      out[backend]["precompute"] = _precompute(backend, num, h, w, args)
  return out
