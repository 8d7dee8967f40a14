"""SSR loss-and-gradient cost per module: random ViT-B/16 weights, batch 4, crop 320 (VOC).

`python -m ssr_jax.bench model [--small] [--dtype bfloat16]` times the jitted value_and_grad of
the SSR loss for: the WeCLIP baseline without PAR, the
WeCLIP baseline (no CMPA, no SGC), +CMPA, +SGC and full SSR, and prints each module's overhead.
"""

import jax
import jax.numpy as jnp
import numpy as np

from configs import voc
from ssr_jax.bench import common
from ssr_jax.clip.model import CLIP, CONFIGS, CLIPConfig, cast_for_compute, init_params
from ssr_jax.clip.preprocess import compute_dtype
from ssr_jax.model.ssr import build_task

SMALL_CLIP = CLIPConfig(
  embed_dim=32,
  image_size=64,
  patch_size=16,
  vision_width=64,
  vision_layers=4,
  vision_heads=4,
  context_length=8,
  vocab_size=64,
  text_width=32,
  text_layers=1,
  text_heads=2,
)


def add_args(p):
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--crop", type=int, default=320)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--iters", type=int, default=10)


def bench_config(args):
  """VOC config sized by the benchmark flags (--small: a tiny CLIP, 64 px)."""
  c = voc.get_config()
  with c.unlocked():
    c.model.dtype = args.dtype
    c.train.batch_size = args.batch
    c.data.crop_size = 64 if args.small else args.crop
    if args.small:
      c.model.cam.num_attn_layers = 3
      c.model.cam.rfm_layers = 3
      c.model.cam.par_iters = 2
  return c


def random_setup(config, *, small, seed=0):
  """(task, frozen, batch) with random CLIP weights and text embeddings; a VOC-like batch with
  2-3 classes per image and 32x32-pixel block superpixels (about 100 per 320 crop)."""
  dtype = compute_dtype(config.model.dtype)
  cfg = SMALL_CLIP if small else CONFIGS["ViT-B/16"]
  clip = CLIP(cfg, dtype=dtype)
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  c = config.data.num_classes - 1
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  frozen = dict(
    clip=cast_for_compute(jax.jit(lambda k: init_params(clip, k))(keys[0]), dtype),
    text_fg=unit(jax.random.normal(keys[1], (c, cfg.embed_dim))),
    text_bg=unit(jax.random.normal(keys[2], (len(config.model.bg_names), cfg.embed_dim))),
  )
  task = build_task(config.model, config.loss, clip=clip, num_classes=config.data.num_classes)
  rng = np.random.default_rng(seed)
  b, s = config.train.batch_size, config.data.crop_size
  labels = np.zeros((b, c), np.float32)
  for i in range(b):
    labels[i, rng.choice(c, size=rng.integers(2, 4), replace=False)] = 1.0
  yy, xx = np.mgrid[:s, :s] // 32
  sp = np.broadcast_to(yy * (s // 32 + 1) + xx, (b, s, s)).astype(np.int32)
  batch = dict(
    image=rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
    labels=labels,
    superpixels=np.ascontiguousarray(sp),
    mask=np.zeros((b, s, s), np.uint8),
    index=np.arange(b, dtype=np.int32),
  )
  return task, frozen, batch


def _variants(config):
  def with_(cmpa, sgc, **cam):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.model.cmpa.enabled = cmpa
      c.model.sgc.enabled = sgc
      c.model.cam.update(cam)
    return c

  return {
    "baseline, no PAR": with_(False, False, par_iters=0),
    "baseline (WeCLIP)": with_(False, False),
    "+CMPA": with_(True, False),
    "+SGC": with_(False, True),
    "SSR (CMPA+SGC)": with_(True, True),
  }


def run(args):
  config = bench_config(args)
  out = dict(
    batch=config.train.batch_size,
    crop=config.data.crop_size,
    dtype=args.dtype,
    arch="small" if args.small else "ViT-B/16",
  )
  times = {}
  for name, cfg in _variants(config).items():
    task, frozen, batch = random_setup(cfg, small=args.small)
    params = task.init(jax.random.PRNGKey(1), batch)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)

    @jax.jit
    def loss_and_grad(params, frozen, batch, step, task=task):
      fn = lambda p: task.loss(p, frozen, batch, step=step, rng=jax.random.PRNGKey(0))  # noqa: E731
      return jax.value_and_grad(fn, has_aux=True)(params)

    step = jnp.int32(cfg.model.cam.rfm_switch_step)  # After the RFM switch: the costlier path.
    t = common.time_fn(loss_and_grad, params, frozen, batch, step, iters=args.iters)
    times[name] = t["median_s"]
    out[f"{name} ms"] = round(1e3 * t["median_s"], 3)
    out[f"{name} compile_s"] = round(t["compile_s"], 1)
  base = times["baseline (WeCLIP)"]
  out["PAR overhead ms"] = round(1e3 * (base - times["baseline, no PAR"]), 3)
  out["CMPA overhead ms"] = round(1e3 * (times["+CMPA"] - base), 3)
  out["SGC overhead ms"] = round(1e3 * (times["+SGC"] - base), 3)
  out["SSR / baseline"] = round(times["SSR (CMPA+SGC)"] / base, 3)
  out["peak_memory_bytes"] = common.peak_memory_bytes()
  return out
