"""Input-pipeline throughput: training images/s of the tf and numpy pipelines, reading the
folders (data.source=files) or their TFDS build (data.source=tfds).

`python -m benchmarks input [--small] [--images 64] [--batch 4] [--crop 320] [--steps 40]
[--sources files,tfds] [--pipelines numpy,numpy-process,tf]`.
Writes VOC-like data to a temporary folder (500x375 JPEGs rendered by the synthetic generator,
class-index PNG masks, superpixel and colour-cluster PNGs, in the VOC layout with a custom split
list), builds its TFDS version (timed), then times full training batches (read, decode,
Pillow-exact rescale, flip, pad, crop, superpixels and clusters) after a short warm-up, per
source and pipeline, and the start-up check of the split's files (data.verify headers / full,
data/check.py) per source. The numbers depend on data.num_workers (threads / parallel calls).
"""

import concurrent.futures
import multiprocessing
import os
import tempfile
import time

from PIL import Image

from benchmarks.superpixels import voc_like_images
from configs import base
from ssr_jax.data import check, files, pipeline, superpixels, tfds_build
from ssr_jax.data import sources as data_sources


def add_args(p):
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--crop", type=int, default=320)
  p.add_argument("--steps", type=int, default=40, help="timed batches per pipeline")
  p.add_argument("--workers", type=int, default=4, help="data.num_workers")
  p.add_argument(
    "--pipelines",
    default="numpy,numpy-process,tf",
    help="numpy (threads), numpy-process (data.worker_type=process), tf",
  )
  p.add_argument("--sources", default="files,tfds", help="data.source values to compare")


def write_voc_like(root: str, num: int, *, height: int = 375, width: int = 500) -> str:
  """Writes a VOC-layout folder under root; returns the path of its split list."""
  images, masks = voc_like_images(num, height=height, width=width)
  os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
  ids = [f"img_{i:05d}" for i in range(num)]
  for i, im, m in zip(ids, images, masks):
    Image.fromarray(im).save(os.path.join(root, "JPEGImages", f"{i}.jpg"), quality=90)
    files.write_png(os.path.join(root, "SegmentationClassAug", f"{i}.png"), m)
  split = os.path.join(root, "bench_split.txt")
  with open(split, "w") as f:
    f.writelines(f"{i}\n" for i in ids)
  return split


def _config(root, split, args):
  c = base.get_config()
  c.data.name = "voc"
  c.data.root = root
  c.data.train_split = split
  c.data.crop_size = args.crop
  c.data.num_workers = args.workers
  return c.data


def run(args) -> dict:
  num = 8 if args.small else args.images
  steps = 3 if args.small else args.steps
  h, w = (188, 250) if args.small else (375, 500)
  out = {
    "images": num,
    "image_size": f"{w}x{h}",
    "crop": args.crop,
    "batch": args.batch,
    "workers": args.workers,
    "timed_batches": steps,
  }
  with tempfile.TemporaryDirectory() as root:
    split = write_voc_like(root, num, height=h, width=w)
    data_cfg = _config(root, split, args)
    data_cfg.tfds_data_dir = os.path.join(root, "tfds")
    superpixels.precompute(data_cfg, split, progress=False)
    sources = args.sources.split(",")
    if "tfds" in sources:
      t0 = time.perf_counter()
      tfds_build.build(data_cfg, [split], superpixels=True, progress=False)
      out["tfds_build_s"] = time.perf_counter() - t0
    for source in sources:
      data_cfg.source = source
      out[source] = {**_time_verify(data_cfg), **_time_pipelines(data_cfg, args, steps)}
  return out


def _time_verify(data_cfg) -> dict:
  """Images/s of the start-up check of the training split (with its maps) at each level; the
  first pass also warms the page cache, as the check does before training."""
  split, store = data_sources.open_split(
    data_cfg, data_cfg.train_split, superpixels=True, clusters=True
  )
  out = {}
  for level in ("headers", "full"):
    t0 = time.perf_counter()
    check.verify_split(split, store, level=level, workers=data_cfg.num_workers)
    out[f"verify_{level}_images_per_s"] = len(split) / (time.perf_counter() - t0)
  return out


def _time_pipelines(data_cfg, args, steps) -> dict:
  """Each pipeline timed in a fresh process: a tf.data run leaves this process ~35% slower
  for whatever runs next in it (measured, not understood), which would bias the comparison."""
  ctx = multiprocessing.get_context("spawn")
  out = {}
  for name in args.pipelines.split(","):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
      out[name] = pool.submit(_time_one, data_cfg, name, args.batch, steps).result()
  return out


def _time_one(data_cfg, name, batch, steps):
  kind = "numpy" if name == "numpy-process" else name
  try:
    kind = pipeline.resolve_pipeline(kind)
    if kind == "tf":
      import tensorflow  # noqa: F401
  except ImportError as e:
    return f"unavailable: {e}"
  data_cfg.worker_type = "process" if name == "numpy-process" else "thread"
  it = pipeline.make_train_iterator(
    data_cfg,
    batch_size=batch,
    seed=0,
    process_index=0,
    process_count=1,
    pipeline=kind,
    superpixels=True,
    clusters=True,
  )
  t0 = time.perf_counter()
  for _ in range(3):  # Warm-up (graph building, worker start).
    next(it)
  warm = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  dt = time.perf_counter() - t0
  it.close()
  return {
    "images_per_s": steps * batch / dt,
    "ms_per_batch": 1e3 * dt / steps,
    "warmup_s": warm,
  }
