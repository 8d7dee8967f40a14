"""The real SSR train step (jitted, sharded, state donated): random ViT-B/16, VOC batch 4 x 320.

`python -m benchmarks train [--small] [--dtype bfloat16] [--steps 20]` prints steps/s,
images/s, peak device memory, XLA FLOPs per step and model FLOPs utilisation, and the number of
compilations over the timed steps (1 = no recompilation; the RFM switch is crossed mid-run).
`--profile DIR` then traces a few more steps with jax.profiler into DIR (open it with
TensorBoard or Perfetto) and adds the device time of each model stage (see benchmarks/profile.py).
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from ssr_jax import experiment
from ssr_jax.model import prototypes
from ssr_jax.train import sharding, state
from ssr_jax.train import step as step_lib


def add_args(p):
  common.add_model_args(p)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--variant", default="ssr", choices=("ssr", "baseline"))
  p.add_argument("--profile", default="", help="trace steps with jax.profiler into this dir")
  p.add_argument("--profile_steps", type=int, default=3)


def run(args):
  ssr = args.variant == "ssr"
  settings = {key: kw for key, _, kw in experiment.VARIANTS}[args.variant]  # Keys ssr, baseline.
  config = experiment.variant_config(common.bench_config(args), **settings)
  config.model.cam.rfm_switch_step = args.steps // 2
  config.model.cmpa.cam_start_step = 0  # CAMs through the heads from the first step.
  task, frozen, batch = common.random_setup(config, small=args.small)
  mesh = sharding.make_mesh()
  tx, schedule = state.make_optimizer(config.train)
  repl = sharding.replicated(mesh)
  gbatch = sharding.put_batch(batch, mesh)
  st = jax.jit(lambda r, b: state.create_train_state(task, tx, r, b), out_shardings=repl)(
    jax.random.PRNGKey(0), gbatch
  )
  frozen = jax.device_put(frozen, repl)
  train_step = step_lib.JittedTrainStep(
    task, tx, schedule=schedule, nan_policy=config.train.nan_policy, mesh=mesh
  )
  t0 = time.perf_counter()  # Compilation happens in the cost analysis; the first call reuses it.
  flops = common.flops_of(train_step, st, frozen, gbatch)
  st, m = train_step(st, frozen, gbatch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    st, m = train_step(st, frozen, gbatch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  peak = common.peak_flops()
  stages = None
  if args.profile:
    st, stages = _profile(train_step, st, frozen, gbatch, args.profile, args.profile_steps)
  out = dict(
    variant=args.variant,
    arch="small" if args.small else "ViT-B/16",
    dtype=args.dtype,
    batch=config.train.batch_size,
    crop=config.data.crop_size,
    devices=mesh.size,
    compile_s=round(compile_s, 1),
    step_ms=round(1e3 * med, 3),
    steps_per_s=round(1 / med, 2),
    images_per_s=round(config.train.batch_size / med, 1),
    minutes_per_30k_steps=round(30000 * med / 60, 1),
    compilations=train_step.trace_count,
    loss=float(m["loss"]),
    xla_tflops_per_step=round(flops / 1e12, 4) if flops else None,
    mfu=round(flops / med / (peak * mesh.size), 4) if flops and peak else None,
    peak_memory_bytes=common.peak_memory_bytes(),
  )
  if ssr:
    out["prototype_refresh_ms"] = _refresh_ms(config.model.cmpa, task.num_classes - 1)
  if stages:
    out["profile"] = stages
  return out


def _refresh_ms(cmpa_cfg, num_classes):
  """Median time of one K-means refresh of a full prototype bank (jitted, on the device)."""
  bank = prototypes.init_bank(cmpa_cfg.bank_size, cmpa_cfg.out_dim, num_classes)
  rng = np.random.default_rng(0)
  bank["image"] = jnp.asarray(rng.normal(size=bank["image"].shape), jnp.float32)
  bank["text"] = jnp.asarray(rng.normal(size=bank["text"].shape), jnp.float32)
  bank["label"] = jnp.asarray(rng.integers(0, num_classes, bank["label"].shape), jnp.int32)
  fn = jax.jit(lambda b: prototypes.bank_refresh(b, iters=cmpa_cfg.kmeans_iters))
  return round(1e3 * common.time_fn(fn, bank, iters=5)["median_s"], 2)


def _profile(train_step, st, frozen, gbatch, trace_dir, steps):
  """Traces `steps` train steps into trace_dir; returns (state, per-stage summary)."""
  from benchmarks import profile

  # The compiled text names the instructions the trace's kernels refer to. Compiling the same
  # HLO again yields the same instruction names as the executable that runs.
  hlo = train_step.lower(st, frozen, gbatch).compile().as_text()
  os.makedirs(trace_dir, exist_ok=True)
  with open(os.path.join(trace_dir, "train_step.hlo.txt"), "w") as f:
    f.write(hlo)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      st, m = train_step(st, frozen, gbatch)
    jax.block_until_ready(m)
  return st, profile.summarize(profile.load_trace(trace_dir), hlo, steps=steps)
