"""What `launch.py --mode ...` runs: wiring of CLIP, data, the SSR task, training and evaluation.

Only this module (and launch.py) sees the whole ConfigDict; everything below it gets sub-configs
or plain values.
"""

import json
import os

import jax
import jax.numpy as jnp
from absl import logging

from ssr_jax.clip import load_clip
from ssr_jax.clip.preprocess import compute_dtype
from ssr_jax.clip.prompts import text_classifier
from ssr_jax.model.ssr import build_task


class UserError(Exception):
  """A problem the user can fix (config, paths, data); printed without a traceback."""


def load_frozen(config, workdir):
  """(CLIP module, frozen pytree {clip, text_fg, text_bg}, weights fingerprint) for a config."""
  from ssr_jax.clip.convert import weights_fingerprint

  dtype = compute_dtype(config.model.dtype)
  if config.data.name == "synthetic" and not config.clip.weights:
    from ssr_jax import demo

    path = demo.ensure_tiny_clip(config, workdir)
  else:
    path = config.clip.weights
  if not path:
    raise UserError(
      "clip.weights is empty: pass --config.clip.weights=/path/to/clip-vit-base-patch16 (a "
      "local Hugging Face CLIP directory with config.json + model.safetensors, or OpenAI's "
      "ViT-B-16.pt). Nothing is downloaded at run time."
    )
  if not os.path.exists(path):
    raise UserError(f"clip.weights={path!r} does not exist")
  clip, params = load_clip(
    path, dtype=dtype, pos_interp=config.clip.pos_interp, cache_dir=config.clip.cache_dir or None
  )
  m = config.model
  templates = [m.prompt_template]
  ctx = clip.cfg.context_length
  text_fg = text_classifier(clip, params, list(m.class_names), templates, context_length=ctx)
  text_bg = text_classifier(clip, params, list(m.bg_names), templates, context_length=ctx)
  frozen = dict(clip=params, text_fg=jnp.asarray(text_fg), text_bg=jnp.asarray(text_bg))
  return clip, frozen, weights_fingerprint(path, cache_dir=config.clip.cache_dir or None)


def build(config, workdir):
  clip, frozen, fingerprint = load_frozen(config, workdir)
  task = build_task(
    config.model,
    config.loss,
    clip=clip,
    num_classes=config.data.num_classes,
    ignore_label=config.data.ignore_label,
  )
  return task, frozen, fingerprint


def train(config, workdir, *, eval_during_training=False):
  from ssr_jax.data import pipeline, superpixels
  from ssr_jax.train import loop

  if config.model.sgc.enabled:
    superpixels.check_superpixels(config.data, config.data.train_split)
  task, frozen, fingerprint = build(config, workdir)

  def make_iterator(start_step):
    return pipeline.make_train_iterator(
      config.data,
      batch_size=config.train.batch_size,
      seed=config.seed,
      start_step=start_step,
    )

  eval_fn = None
  if eval_during_training and config.train.eval_every > 0:
    from ssr_jax.eval import run as eval_run

    def eval_fn(state, step):
      res = eval_run.evaluate(
        config,
        workdir,
        task=task,
        frozen=frozen,
        params=state.params,
        step=step,
        target="seg",
        split=config.data.val_split,
        write_outputs=False,
      )
      return dict(miou=res["miou"], images=res.get("images", {}))

  return loop.train(
    config,
    workdir,
    task=task,
    frozen=frozen,
    make_iterator=make_iterator,
    eval_fn=eval_fn,
    clip_fingerprint=fingerprint,
  )


def evaluate(config, workdir):
  """Restores the checkpoint and evaluates config.eval.target on config.eval.split."""
  from ssr_jax.eval import run as eval_run

  task, frozen, fingerprint = build(config, workdir)
  ckpt_step = None if config.eval.checkpoint_step < 0 else int(config.eval.checkpoint_step)
  params, step = eval_run.restore_params(workdir, task, step=ckpt_step)
  res = eval_run.evaluate(
    config,
    workdir,
    task=task,
    frozen=frozen,
    params=params,
    step=step,
    target=config.eval.target,
    split=config.eval.split,
    clip_fingerprint=fingerprint,
  )
  return res


def run(mode, config, workdir):
  """Runs a launch.py mode; problems the user can fix surface as UserError (no traceback)."""
  from ssr_jax.data.files import DataError
  from ssr_jax.train.checkpoint import CheckpointMismatchError
  from ssr_jax.train.loop import NonFiniteError

  try:
    return _run(mode, config, workdir)
  except (DataError, FileNotFoundError, CheckpointMismatchError, NonFiniteError) as e:
    raise UserError(str(e)) from e


def _run(mode, config, workdir):
  os.makedirs(workdir, exist_ok=True)
  logging.info("mode=%s workdir=%s devices=%s", mode, workdir, jax.devices())
  if config.data.name == "synthetic":
    from ssr_jax import demo

    demo.ensure_data(config, workdir)
    if mode == "ablation":
      return demo.ablation(config, workdir)
    if mode == "train_and_eval":
      return demo.train_and_eval(config, workdir)
  if mode == "ablation":
    raise UserError("--mode=ablation runs on the synthetic demo: use --config configs/demo.py")
  if mode in ("train", "train_and_eval"):
    train(config, workdir, eval_during_training=True)
  if mode in ("eval", "train_and_eval"):
    res = evaluate(config, workdir)
    print(json.dumps({k: res[k] for k in ("miou", "pixel_accuracy") if k in res}))
