"""SSR loss-and-gradient cost per module: random ViT-B/16 weights, batch 4, crop 320 (VOC).

`python -m benchmarks model [--small] [--dtype bfloat16]` times the jitted value_and_grad of
the SSR loss for the WeCLIP baseline without PAR and each row of --mode ablation
(experiment.VARIANTS: baseline, +CMPA, +DINO attention, +SGC, SSR), and prints each module's
overhead.
"""

import jax
import jax.numpy as jnp

from benchmarks import common
from ssr_jax import experiment


def add_args(p):
  common.add_model_args(p)
  p.add_argument("--iters", type=int, default=10)


def _variants(config):
  settings = {key: kw for key, _, kw in experiment.VARIANTS}

  def with_(key, **cam):
    c = experiment.variant_config(config, **settings[key])
    c.model.cam.update(cam)
    return c

  rows = {"baseline, no PAR": with_("baseline", par_iters=0)}
  rows.update({name: with_(key) for key, name, _ in experiment.VARIANTS})
  return rows


def run(args):
  config = common.bench_config(args)
  out = dict(
    batch=config.train.batch_size,
    crop=config.data.crop_size,
    dtype=args.dtype,
    arch="small" if args.small else "ViT-B/16",
  )
  times = {}
  for name, cfg in _variants(config).items():
    task, frozen, batch = common.random_setup(cfg, small=args.small)
    variables = task.init(jax.random.PRNGKey(1), batch)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)

    @jax.jit
    def loss_and_grad(variables, frozen, batch, step, task=task):
      def fn(p):
        v = {**variables, "params": p}
        return task.loss(v, frozen, batch, step=step, rng=jax.random.PRNGKey(0))

      return jax.value_and_grad(fn, has_aux=True)(variables["params"])

    # After the RFM switch and the heads' CAM start: the costlier path.
    step = jnp.int32(max(cfg.model.cam.rfm_switch_step, cfg.model.cmpa.cam_start_step))
    t = common.time_fn(loss_and_grad, variables, frozen, batch, step, iters=args.iters)
    times[name] = t["median_s"]
    out[f"{name} ms"] = round(1e3 * t["median_s"], 3)
    out[f"{name} compile_s"] = round(t["compile_s"], 1)
  base = times["baseline (WeCLIP)"]
  out["PAR overhead ms"] = round(1e3 * (base - times["baseline, no PAR"]), 3)
  out["CMPA overhead ms"] = round(1e3 * (times["+CMPA"] - base), 3)
  out["DINO attention overhead ms"] = round(
    1e3 * (times["+CMPA +DINO attention"] - times["+CMPA"]), 3
  )
  out["SGC overhead ms"] = round(1e3 * (times["+SGC (DINO + region mask)"] - base), 3)
  out["SSR / baseline"] = round(times["SSR (CMPA + SGC)"] / base, 3)
  out["peak_memory_bytes"] = common.peak_memory_bytes()
  return out
