"""Superpixel throughput and quality per backend on VOC-sized (500x375) synthetic images.

`python -m benchmarks superpixels [--small] [--images 16] [--n-segments 100]`.
Images/s of `ssr_jax.data.superpixels.compute` in one process (the precompute CLI runs one
such process per core), the ratio to skimage, mean superpixel count, and the achievable
segmentation accuracy (ASA: pixel accuracy when every superpixel takes its majority
ground-truth class; 1.0 = superpixels never straddle a class boundary).
"""

import time

import numpy as np

from ssr_jax.data import superpixels, synthetic


def add_args(p):
  p.add_argument("--images", type=int, default=16, help="500x375 images per backend")
  p.add_argument("--n-segments", type=int, default=100, help="per 320x320 area (§3.1)")
  p.add_argument("--backends", default="skimage,opencv")


def voc_like_images(num: int, *, height: int = 375, width: int = 500, seed: int = 0):
  """(images uint8 [N, H, W, 3], masks uint8 [N, H, W]) from the synthetic renderer."""
  size = max(height, width)
  data = synthetic.generate(num, size=size, seed=seed)
  return data["image"][:, :height, :width], data["mask"][:, :height, :width]


def asa(sp: np.ndarray, mask: np.ndarray) -> float:
  """Achievable segmentation accuracy of superpixels sp [H, W] against mask [H, W]."""
  joint = np.zeros((sp.max() + 1, 256), np.int64)
  np.add.at(joint, (sp.ravel(), mask.ravel()), 1)
  return float(joint.max(1).sum() / sp.size)


def run(args) -> dict:
  n = 4 if args.small else args.images
  h, w = (188, 250) if args.small else (375, 500)
  images, masks = voc_like_images(n, height=h, width=w)
  out = {"image_size": f"{w}x{h}", "images": n, "n_segments": args.n_segments}
  base = None
  for backend in args.backends.split(","):
    try:
      superpixels.compute(images[0], backend=backend, n_segments=args.n_segments)  # Warm-up.
    except RuntimeError as e:
      out[backend] = f"unavailable: {e}"
      continue
    t0 = time.perf_counter()
    maps = [superpixels.compute(im, backend=backend, n_segments=args.n_segments) for im in images]
    dt = time.perf_counter() - t0
    ips = n / dt
    base = ips if backend == "skimage" else base
    out[backend] = {
      "images_per_s": ips,
      "ms_per_image": 1e3 * dt / n,
      "mean_segments": float(np.mean([m.max() + 1 for m in maps])),
      "asa": float(np.mean([asa(m, k) for m, k in zip(maps, masks)])),
    }
  for backend in args.backends.split(","):
    if isinstance(out.get(backend), dict) and base:
      out[backend]["speedup_vs_skimage"] = out[backend]["images_per_s"] / base
  return out
