"""`python -m ssr_jax.predict` and evaluation throughput: a handful of photos of mixed sizes,
tiny random model.

`python -m benchmarks predict [--small] [--photos 6] [--batch 16]` times predict's batching
(one batch per input size, no larger than the photos at hand) against the former padding of
every batch to eval.batch_size, and evaluation's `seg` predictions (the same batching, from an
EvalDataset of the photos saved as JPEGs in a VOC-layout folder, their sizes read from the file
headers) against its former single stream padded the same way; each after a warm-up pass that
compiles its programs (the machine line printed first names the CPU, where predict mostly runs).
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from benchmarks import common
from configs import voc
from ssr_jax import predict
from ssr_jax.data import files, pipeline
from ssr_jax.eval import run as eval_run

PHOTO_SIZES = ((400, 600), (600, 400), (375, 500), (480, 640), (400, 600), (333, 500))


def add_args(p):
  p.add_argument("--photos", type=int, default=6)
  p.add_argument("--batch", type=int, default=16, help="eval.batch_size (the former padding)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def _photos(n, *, small, seed=0):
  """Smooth random colour fields (not white noise) of PHOTO_SIZES, cycled; 1/4 size if small."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = PHOTO_SIZES[i % len(PHOTO_SIZES)]
    h, w = (h // 4, w // 4) if small else (h, w)
    coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3)).astype(np.float32)
    rows = np.linspace(0, coarse.shape[0] - 1, h).astype(int)
    cols = np.linspace(0, coarse.shape[1] - 1, w).astype(int)
    out.append(coarse[rows][:, cols].astype(np.uint8))
  return out


def _timed(fn):
  t0 = time.perf_counter()
  count = sum(1 for _ in fn())
  return count, time.perf_counter() - t0


def run(args):
  # Always the tiny CLIP with random weights; --small also shrinks the photos and long side.
  tiny = argparse.Namespace(small=True, batch=2, crop=64, dtype=args.dtype)
  config = common.bench_config(tiny)
  config.eval.batch_size = args.batch
  if args.small:
    config.eval.long_side = 128
  task, frozen, batch = common.random_setup(config, small=True)
  params = task.init(jax.random.PRNGKey(0), batch)
  photos = _photos(args.photos, small=args.small)

  def planned():
    return predict.segment(task, frozen, params, photos, config.eval)

  def padded():  # Before: one stream, every size bucket's batch padded to eval.batch_size.
    return eval_run.seg_predictions(task, frozen, params, photos, config.eval)

  def single():  # One photo alone, as `predict --images photo.jpg`.
    return predict.segment(task, frozen, params, photos[:1], config.eval)

  folder = tempfile.TemporaryDirectory(prefix="bench_predict_")
  dataset = _eval_dataset(folder.name, photos)

  def eval_planned():  # Evaluation's seg target now.
    return eval_run.predict_seg(task, frozen, params, dataset, config.eval)

  def eval_padded():  # Evaluation before: one stream of the dataset, padded as `padded`.
    images = (ex["image"] for ex in dataset)
    return eval_run.seg_predictions(task, frozen, params, images, config.eval)

  out = dict(
    devices=jax.local_device_count(),
    photos=len(photos),
    sizes=sorted({p.shape[:2] for p in photos}),
    long_side=config.eval.long_side,
    eval_batch_size=config.eval.batch_size,
  )
  runs = dict(
    planned=planned,
    padded=padded,
    single_photo=single,
    eval_planned=eval_planned,
    eval_padded=eval_padded,
  )
  with folder:
    for name, fn in runs.items():
      _, first = _timed(fn)  # Compiles.
      count, seconds = _timed(fn)
      out[f"{name}_first_pass_s"] = round(first, 2)
      out[f"{name}_s"] = round(seconds, 3)
      out[f"{name}_images_per_s"] = round(count / seconds, 2)
  return out


def _eval_dataset(root, photos):
  """The photos as a VOC-layout folder (JPEGs, empty masks) and its EvalDataset."""
  ids = [f"photo{i}" for i in range(len(photos))]
  os.makedirs(f"{root}/JPEGImages")
  for i, p in zip(ids, photos):
    Image.fromarray(p).save(f"{root}/JPEGImages/{i}.jpg", quality=95)
    files.write_png(f"{root}/SegmentationClassAug/{i}.png", np.zeros(p.shape[:2], np.uint8))
  files.write_bytes(f"{root}/photos.txt", "".join(f"{i}\n" for i in ids).encode())
  data = voc.get_config().data
  data.root, data.num_workers = root, 2
  return pipeline.make_eval_dataset(data, f"{root}/photos.txt", superpixels=False)
