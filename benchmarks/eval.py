"""Evaluation throughput: multi-scale + flip decoder inference on VOC-shaped images.

`python -m benchmarks eval [--small] [--images 64] [--dtype bfloat16]`: random ViT-B/16 SSR
weights, images with VOC's common sizes (500x375, 375x500, 500x333), scales (1.0, 0.75) + flip,
long side 512, sharded over all devices. Prints images/s after compilation and the projected
time for VOC val (1,449 images), CRF excluded.
"""

import time

import jax
import numpy as np

from benchmarks import common
from ssr_jax.eval import inference
from ssr_jax.eval import run as eval_run

VOC_SIZES = ((375, 500), (500, 375), (333, 500))


def add_args(p):
  p.add_argument("--images", type=int, default=64)
  common.add_model_args(p, batch=8, crop=None)


def run(args):
  args.crop = 64 if args.small else 320
  config = common.bench_config(args)
  config.eval.batch_size = args.batch
  if args.small:
    config.eval.long_side = 64
  task, frozen, batch = common.random_setup(config, small=args.small)
  params = task.init(jax.random.PRNGKey(0), batch)
  rng = np.random.default_rng(0)
  sizes = [VOC_SIZES[i % len(VOC_SIZES)] for i in range(args.images)]
  if args.small:
    sizes = [(h // 8, w // 8) for h, w in sizes]
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]

  def go(n):
    t0 = time.perf_counter()
    count = sum(1 for _ in eval_run.seg_predictions(task, frozen, params, images[:n], config.eval))
    return count, time.perf_counter() - t0

  warm_n = len(VOC_SIZES) * config.eval.batch_size  # Compiles every size bucket once.
  _, compile_s = go(min(warm_n, len(images)))
  cached = inference._multiscale_jit._cache_size()
  count, seconds = go(len(images))
  # Anything compiled inside the timed pass would be in the figure: report it (should be 0).
  recompiled = inference._multiscale_jit._cache_size() - cached
  ips = count / seconds
  return dict(
    arch="small" if args.small else "ViT-B/16",
    dtype=args.dtype,
    scales=list(config.eval.scales),
    flip=config.eval.flip,
    batch=config.eval.batch_size,
    devices=jax.device_count(),
    first_pass_s_incl_compile=round(compile_s, 1),
    images=count,
    timed_pass_compilations=recompiled,
    images_per_s=round(ips, 2),
    voc_val_1449_minutes=round(1449 / ips / 60, 2),
  )
