"""What `launch.py --mode ...` runs: the one home of the wiring of CLIP, DINO, data, the SSR task,
training and evaluation.

Modes mean the same for every dataset (VOC, COCO, the synthetic demo):
- train: train (or resume) to train.num_steps, evaluating `seg` every train.eval_every steps;
- eval: restore the checkpoint's variables and evaluate each of eval.targets on each of
  eval.splits;
- train_and_eval: both;
- ablation: train_and_eval of each row of VARIANTS (the paper's ladder) with the same seeds,
  one table.
For data.name == "synthetic", `demo.prepare` first generates the data and points clip.weights
and dino.weights at the tiny CLIP and DINO; for "folder", `sources.configure` reads the class
count, prompts and max_classes from the folder (or its TFDS build). Nothing below this module
calls back into it. This module and the train/eval drivers see the whole ConfigDict;
everything below them gets sub-configs or plain values.
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath

from ssr_jax import demo, machine
from ssr_jax.clip import load_clip
from ssr_jax.clip.convert import weights_fingerprint
from ssr_jax.clip.preprocess import compute_dtype
from ssr_jax.clip.prompts import text_classifier
from ssr_jax.data import pipeline, sources
from ssr_jax.data.files import DataError
from ssr_jax.dino import convert as dino_convert
from ssr_jax.eval import run as eval_run
from ssr_jax.model.ssr import build_task, sgc_inputs
from ssr_jax.train import loop as train_loop
from ssr_jax.train.checkpoint import CheckpointMismatchError

# --mode ablation: (name, settings) rows, each trained and evaluated with the same seeds. The
# paper's ladder (Tables 3-4: CMPA CAM -> + CLIP attention -> + DINO attention -> + SGC mask) with
# the paper's values: cmpa on/off (off: frozen CLIP's CAMs), dino = CLIP : DINO weight of the
# affinity, sgc = SGC's grouping or None (off). A last row, "as configured", runs the config
# itself when it differs from all of these (the demo's [v1] SGC).
PAPER_DINO_WEIGHT = 0.6
VARIANTS = (
  ("baseline (WeCLIP)", dict(cmpa=False, dino=0.0, sgc=None)),
  ("+CMPA", dict(cmpa=True, dino=0.0, sgc=None)),
  ("+CMPA +DINO attention", dict(cmpa=True, dino=PAPER_DINO_WEIGHT, sgc=None)),
  ("+SGC (DINO + region mask)", dict(cmpa=False, dino=PAPER_DINO_WEIGHT, sgc="clusters")),
  ("SSR (CMPA + SGC)", dict(cmpa=True, dino=PAPER_DINO_WEIGHT, sgc="clusters")),
)


class UserError(Exception):
  """A problem the user can fix (config, paths, data); printed without a traceback."""


def load_dino(config):
  """(DINO module, params, fingerprint) of config.dino.weights, or (None, None, "") when it is
  empty or unused (model.cam.dino_weight = 0)."""
  path = config.dino.weights
  if not path or config.model.cam.dino_weight <= 0:
    return None, None, ""
  if not epath.Path(path).exists():
    raise UserError(f"dino.weights={path!r} does not exist")
  cache_dir = config.dino.cache_dir or None
  try:
    dino, params = dino_convert.load_dino(
      path, dtype=compute_dtype(config.model.dtype), cache_dir=cache_dir
    )
  except ValueError as e:
    raise UserError(f"dino.weights={path!r}: {e}") from e
  return dino, params, dino_convert.weights_fingerprint(path, cache_dir=cache_dir)


def load_frozen(config):
  """(CLIP module, DINO module or None, frozen pytree {clip, text_fg, text_bg[, dino]}, weights
  fingerprint) for a config."""
  path = config.clip.weights
  if not path:
    raise UserError(
      "clip.weights is empty: pass --config.clip.weights=/path/to/clip-vit-base-patch16 (a "
      "local Hugging Face CLIP directory with config.json + model.safetensors, or OpenAI's "
      "ViT-B-16.pt). Nothing is downloaded at run time."
    )
  if not epath.Path(path).exists():
    raise UserError(f"clip.weights={path!r} does not exist")
  cache_dir = config.clip.cache_dir or None
  clip, params = load_clip(
    path,
    dtype=compute_dtype(config.model.dtype),
    pos_interp=config.clip.pos_interp,
    cache_dir=cache_dir,
  )
  m, ctx = config.model, clip.cfg.context_length
  templates = [m.prompt_template]
  text_fg = text_classifier(clip, params, list(m.class_names), templates, context_length=ctx)
  text_bg = text_classifier(clip, params, list(m.bg_names), templates, context_length=ctx)
  frozen = dict(clip=params, text_fg=jnp.asarray(text_fg), text_bg=jnp.asarray(text_bg))
  fingerprint = weights_fingerprint(path, cache_dir=cache_dir)
  dino, dino_params, dino_fingerprint = load_dino(config)
  if dino is not None:
    frozen["dino"] = dino_params
    fingerprint = f"{fingerprint}+dino:{dino_fingerprint}"
  return clip, dino, frozen, fingerprint


def make_task(config, *, clip, dino=None):
  """The SSRTask of a config for frozen CLIP (and DINO) modules: the one place that reads the
  task's settings from config.model, config.loss and config.data."""
  return build_task(
    config.model,
    config.loss,
    clip=clip,
    num_classes=config.data.num_classes,
    ignore_label=config.data.ignore_label,
    dino=dino,
    num_regions=config.data.color_clusters,
  )


def build(config):
  """(SSRTask, frozen pytree, frozen weights fingerprint)."""
  clip, dino, frozen, fingerprint = load_frozen(config)
  try:
    task = make_task(config, clip=clip, dino=dino)
  except ValueError as e:
    raise UserError(str(e)) from e
  return task, frozen, fingerprint


def batches(config):
  """make_iterator(start_step) for train.loop.train: this process's training batches from a step
  on (superpixels or colour clusters required exactly when SGC uses them)."""

  def make_iterator(start_step):
    return pipeline.make_train_iterator(
      config.data,
      batch_size=config.train.batch_size,
      seed=config.seed,
      start_step=start_step,
      **sgc_inputs(config.model.sgc.enabled, config.model.sgc.grouping),
    )

  return make_iterator


def train(config, workdir):
  """Trains (or resumes) to train.num_steps; `seg` mIoU on the val split every eval_every."""
  task, frozen, fingerprint = build(config)

  def eval_fn(state, step):
    res = eval_run.evaluate(
      config,
      workdir,
      task=task,
      frozen=frozen,
      variables={"params": state.params, **state.model_state},
      step=step,
      target="seg",
      split=config.data.val_split,
      write_outputs=False,
    )
    miou = float("nan") if res["miou"] is None else res["miou"]  # None: the split has no masks.
    return dict(miou=miou, images=res.get("images", {}))

  return train_loop.train(
    config,
    workdir,
    task=task,
    frozen=frozen,
    make_iterator=batches(config),
    eval_fn=eval_fn if config.train.eval_every > 0 else None,
    clip_fingerprint=fingerprint,
  )


def evaluate(config, workdir) -> dict:
  """Restores the checkpoint's variables and evaluates each of eval.targets on each of
  eval.splits.

  Returns {split: {target: result dict (miou, precision, recall, per-class IoU, ...)}}.
  """
  unknown = sorted(set(config.eval.targets) - set(eval_run.TARGETS))
  if unknown or not config.eval.targets:
    raise UserError(
      f"eval.targets={tuple(config.eval.targets)}: use a subset of {eval_run.TARGETS}"
    )
  if not config.eval.splits:
    raise UserError("eval.splits is empty: name at least one split, e.g. ('val',)")
  task, frozen, fingerprint = build(config)
  ckpt_step = None if config.eval.checkpoint_step < 0 else int(config.eval.checkpoint_step)
  variables, step = eval_run.restore_variables(workdir, task, step=ckpt_step)
  results = {}
  for split in config.eval.splits:
    results[split] = {}
    for target in config.eval.targets:
      results[split][target] = eval_run.evaluate(
        config,
        workdir,
        task=task,
        frozen=frozen,
        variables=variables,
        step=step,
        target=target,
        split=split,
        clip_fingerprint=fingerprint,
      )
  if jax.process_index() == 0:
    for split, res in results.items():
      figures = "  ".join(f"{t} {_score(r['miou'])}" for t, r in res.items())
      print(f"mIoU on {split}: {figures}")
      zero_shot = next((r["zero_shot"]["map"] for r in res.values() if "zero_shot" in r), None)
      seg = res.get("seg", {}).get("seg_classification", {}).get("map")
      if zero_shot is not None:
        print(f"image-level mAP on {split}: zero-shot CLIP {_score(zero_shot)}  seg {_score(seg)}")
    print(f"metrics, predictions and visualisations: {epath.Path(workdir) / 'eval'}")
  return results


def _score(v) -> str:
  """A metric in a one-line summary: 3 decimals, or "-" where undefined (no masks)."""
  return "-" if v is None else f"{v:.3f}"


def variant_config(config, *, cmpa: bool, dino: float, sgc: str | None):
  """The config of one ablation row (see VARIANTS), all else (seeds) unchanged."""
  cfg = config.copy_and_resolve_references()
  cfg.model.cmpa.enabled = cmpa
  if not cmpa:
    cfg.model.cam.source = "clip"
  cfg.model.cam.dino_weight = dino
  cfg.model.sgc.enabled = sgc is not None
  if sgc is not None and sgc != cfg.model.sgc.grouping:
    cfg.model.sgc.grouping = sgc
    if sgc == "clusters":  # [v1]-only options off.
      cfg.model.sgc.receiver_mask = False
      cfg.model.sgc.soft_alpha = 1.0
  return cfg


def ablation_rows(config) -> list:
  """[(name, config)] of --mode ablation: VARIANTS, plus "as configured" when the config is none
  of them."""
  rows = [(name, variant_config(config, **kw)) for name, kw in VARIANTS]
  own = config.copy_and_resolve_references()
  if all(own.to_dict() != cfg.to_dict() for _, cfg in rows):
    rows.append(("as configured", own))
  return rows


def ablation(config, workdir) -> list:
  """train_and_eval of each of VARIANTS with the same seeds; writes ablation.md and .json
  (one entry per variant: {"variant": name, split: {target: mIoU}} for each of eval.splits)."""
  rows = []
  for name, cfg in ablation_rows(config):
    slug = "_".join(w.strip("()").replace("+", "plus_") for w in name.lower().split())
    sub = str(epath.Path(workdir) / "ablation" / slug)
    train(cfg, sub)
    res = evaluate(cfg, sub)
    rows.append((name, {sp: {t: r["miou"] for t, r in rs.items()} for sp, rs in res.items()}))
  targets = list(config.eval.targets)
  lines = [
    f"Ablation on {config.data.name} (seed {config.seed}, {config.train.num_steps} steps; mIoU)",
    "",
    "| variant | split | " + " | ".join(targets) + " |",
    "|---" * (len(targets) + 2) + "|",
  ]
  for n, per_split in rows:
    for sp, r in per_split.items():
      lines.append(f"| {n} | {sp} | " + " | ".join(_score(r[t]) for t in targets) + " |")
  text = "\n".join(lines) + "\n"
  if jax.process_index() == 0:
    (epath.Path(workdir) / "ablation.md").write_text(text)
    table = [{"variant": n, **per_split} for n, per_split in rows]
    (epath.Path(workdir) / "ablation.json").write_text(json.dumps(table, indent=1))
    print(text)
  return rows


def run(mode, config, workdir):
  """Runs a launch.py mode; problems the user can fix surface as UserError (no traceback)."""
  try:
    # First: a folder dataset's classes, prompts and max_classes, which all else reads.
    config = sources.configure(config)
    return _run(mode, config, workdir)
  except (
    DataError,
    FileNotFoundError,
    CheckpointMismatchError,
    train_loop.NonFiniteError,
    demo.DemoError,
  ) as e:
    raise UserError(str(e)) from e


def _run(mode, config, workdir):
  t0 = time.time()
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  logging.info("mode=%s workdir=%s devices=%s", mode, workdir, jax.devices())
  if config.data.name == "synthetic":
    config = demo.prepare(config, workdir)
  result = None
  if mode == "ablation":
    result = ablation(config, workdir)
  if mode in ("train", "train_and_eval"):
    train(config, workdir)
  if mode in ("eval", "train_and_eval"):
    result = evaluate(config, workdir)
  if jax.process_index() == 0:  # A timing names its machine (CPUs differ 2.6x on the demo).
    print(f"{mode} done in {time.time() - t0:.0f} s on {machine.cpu_line()}")
  return result
