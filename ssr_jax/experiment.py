"""What `launch.py --mode ...` runs: the one home of the wiring of CLIP, DINO, data, the SSR task,
training and evaluation.

Modes mean the same for every dataset (VOC, COCO, the synthetic demo):
- train: train (or resume) to train.num_steps, evaluating `seg` every train.eval_every steps;
- eval: restore the checkpoint's variables and evaluate each of eval.targets on each of
  eval.splits (default: data.val_split);
- train_and_eval: both;
- ablation: train_and_eval of each row of VARIANTS (the paper's ladder) with each of
  ablation.num_seeds seeds (seed, seed + 1, ...), summarised over seeds (ssr_jax/ablation.py).
For data.name == "synthetic", `demo.prepare` first generates the data and points clip.weights
and dino.weights at the tiny CLIP and DINO; for "folder", `sources.configure` reads the class
count, prompts and max_classes from the folder (or its TFDS build). Nothing below this module
calls back into it. This module and the train/eval drivers see the whole ConfigDict;
everything below them gets sub-configs or plain values.

SIGTERM (preemption), in any mode: training finishes its step, saves a checkpoint and stops
(train/loop.py); anything else (evaluation, data preparation) stops where it is. Nothing
after that runs (no evaluation of an unfinished model): `run` reports the run incomplete in one
line and returns normally, so the process exits 0; rerunning the same command resumes.
"""

import contextlib
import json
import signal
import threading
import time

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath

from ssr_jax import ablation as ablation_lib
from ssr_jax import demo, machine
from ssr_jax.clip import load_clip
from ssr_jax.clip.convert import weights_fingerprint
from ssr_jax.clip.preprocess import compute_dtype
from ssr_jax.clip.prompts import text_classifier
from ssr_jax.config_check import check_config
from ssr_jax.data import pipeline, sources, synthetic
from ssr_jax.data.files import DataError
from ssr_jax.dino import convert as dino_convert
from ssr_jax.eval import run as eval_run
from ssr_jax.model.ssr import build_task, sgc_inputs
from ssr_jax.train import loop as train_loop
from ssr_jax.train.checkpoint import CheckpointDamagedError, CheckpointMismatchError
from ssr_jax.train.metric_writer import MetricWriter

# --mode ablation: (key, name, settings) rows, each trained and evaluated with the same seeds.
# The paper's ladder (Tables 3-4: CMPA CAM -> + CLIP attention -> + DINO attention -> + SGC mask)
# with the paper's values: cmpa on/off (off: frozen CLIP's CAMs), dino = CLIP : DINO weight of
# the affinity, sgc = SGC's grouping or None (off). A last row, "as configured" (key
# "configured"), runs the config itself when it differs from all of these (e.g. a [v1] SGC).
# ablation.COMPONENTS names the rows by key.
PAPER_DINO_WEIGHT = 0.6
VARIANTS = (
  ("baseline", "baseline (WeCLIP)", dict(cmpa=False, dino=0.0, sgc=None)),
  ("cmpa", "+CMPA", dict(cmpa=True, dino=0.0, sgc=None)),
  (
    "cmpa_intra",
    "+CMPA, intra-modal contrast",
    dict(cmpa=True, dino=0.0, sgc=None, contrast="intra"),
  ),
  ("cmpa_dino", "+CMPA +DINO attention", dict(cmpa=True, dino=PAPER_DINO_WEIGHT, sgc=None)),
  ("sgc", "+SGC (DINO + region mask)", dict(cmpa=False, dino=PAPER_DINO_WEIGHT, sgc="clusters")),
  ("ssr", "SSR (CMPA + SGC)", dict(cmpa=True, dino=PAPER_DINO_WEIGHT, sgc="clusters")),
)
CONFIGURED = ("configured", "as configured")


class UserError(Exception):
  """A problem the user can fix (config, paths, data); printed without a traceback."""


class Preempted(BaseException):
  """SIGTERM: the run stops early. A BaseException, like KeyboardInterrupt, so that no `except
  Exception` on the way (a checkpoint read, a data check) takes it for a failure of its own."""


@contextlib.contextmanager
def sigterm_stops(what: str):
  """While active (on the main thread), SIGTERM raises Preempted(what) in the main thread; the
  training loop overrides this with its save-then-stop handler while it trains."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    raise Preempted(what)

  previous = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


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
  try:
    clip, params = load_clip(
      path,
      dtype=compute_dtype(config.model.dtype),
      pos_interp=config.clip.pos_interp,
      cache_dir=cache_dir,
    )
  except ValueError as e:
    raise UserError(f"clip.weights={path!r}: {e}") from e
  dino, dino_params, dino_fingerprint = load_dino(config)  # Before the text encoder runs.
  m, ctx = config.model, clip.cfg.context_length
  templates = [m.prompt_template]
  text_fg = text_classifier(clip, params, list(m.class_names), templates, context_length=ctx)
  text_bg = text_classifier(clip, params, list(m.bg_names), templates, context_length=ctx)
  frozen = dict(clip=params, text_fg=jnp.asarray(text_fg), text_bg=jnp.asarray(text_bg))
  fingerprint = weights_fingerprint(path, cache_dir=cache_dir)
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
  on (superpixels or colour clusters required exactly when SGC uses them). The split is opened
  and its files checked (data.verify) here, once."""
  source = pipeline.open_train_source(
    config.data,
    batch_size=config.train.batch_size,
    seed=config.seed,
    **sgc_inputs(config.model.sgc.enabled, config.model.sgc.grouping),
  )
  return lambda start_step: pipeline.train_iterator(config.data, source, start_step=start_step)


def train(config, workdir):
  """Trains (or resumes) to train.num_steps; `seg` mIoU on the val split every eval_every."""
  make_iterator = batches(config)  # Bad data stops the run here, before the weights load.
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
    make_iterator=make_iterator,
    eval_fn=eval_fn if config.train.eval_every > 0 else None,
    clip_fingerprint=fingerprint,
  )


def eval_splits(config) -> tuple[str, ...]:
  """The splits --mode eval scores: eval.splits, or (data.val_split,) when it is empty."""
  return tuple(config.eval.splits) or (config.data.val_split,)


def evaluate(config, workdir) -> dict:
  """Restores the checkpoint's variables and evaluates each of eval.targets on each of
  `eval_splits(config)`; writes eval/metrics.json (all of them) on process 0.

  Returns {split label: {target: result dict (miou, precision, recall, per-class IoU, ...)}}
  (label: `eval_run.split_label`, a list file's stem).
  """
  splits = eval_splits(config)
  labels = [eval_run.split_label(s) for s in splits]
  if len(set(labels)) < len(labels):
    raise UserError(
      f"eval.splits={splits} name their outputs {labels}: give the list files distinct names"
    )
  task, frozen, fingerprint = build(config)
  ckpt_step = None if config.eval.checkpoint_step < 0 else int(config.eval.checkpoint_step)
  variables, step = eval_run.restore_variables(workdir, task, step=ckpt_step)
  results = {}
  for split, label in zip(splits, labels):
    results[label] = {}
    for target in config.eval.targets:
      results[label][target] = eval_run.evaluate(
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
  log_evaluation(workdir, step, results)
  if jax.process_index() == 0:
    path = eval_run.write_metrics(workdir, results)
    for label, res in results.items():
      figures = "  ".join(f"{t} {_score(r['miou'])}" for t, r in res.items())
      print(f"mIoU on {label}: {figures}")
      zero_shot = next((r["zero_shot"]["map"] for r in res.values() if "zero_shot" in r), None)
      seg = res.get("seg", {}).get("seg_classification", {}).get("map")
      if zero_shot is not None:
        print(f"image-level mAP on {label}: zero-shot CLIP {_score(zero_shot)}  seg {_score(seg)}")
    print(f"metrics ({path}), predictions and visualisations: {epath.Path(workdir) / 'eval'}")
  return results


def _score(v) -> str:
  """A metric in a one-line summary: 3 decimals, or "-" where undefined (no masks)."""
  return "-" if v is None else f"{v:.3f}"


def log_evaluation(workdir, step, results) -> None:
  """Eval mode's TensorBoard record under workdir/eval (tensorboard/ and eval_metrics.jsonl):
  each split and target's mIoU, precision, recall and confusion ratio, and its confusion
  heatmap (the training run's own evaluations go to workdir/tensorboard through the loop)."""
  writer = MetricWriter(epath.Path(workdir) / "eval", enabled=jax.process_index() == 0)
  for split, per_target in results.items():
    for target, r in per_target.items():
      keys = ("miou", "precision", "recall", "confusion_ratio")
      scalars = {f"{split}/{target}/{k}": r[k] for k in keys if r.get(k) is not None}
      writer.write_scalars(step, scalars, kind="eval")
      key = eval_run.confusion_key(split, target)
      if key in r.get("images", {}):
        writer.write_images(step, {f"eval/{key}": r["images"][key]})
  writer.close()


def variant_config(config, *, cmpa: bool, dino: float, sgc: str | None, contrast: str = "cross"):
  """The config of one ablation row (see VARIANTS), all else (seeds) unchanged."""
  cfg = config.copy_and_resolve_references()
  cfg.model.cmpa.enabled = cmpa
  cfg.model.cmpa.contrast = contrast
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
  """[(key, name, config)] of --mode ablation: VARIANTS, plus "as configured" when the config
  is none of them; only the keys in ablation.rows when it is set."""
  rows = [(key, name, variant_config(config, **kw)) for key, name, kw in VARIANTS]
  own = config.copy_and_resolve_references()
  if all(own.to_dict() != cfg.to_dict() for _, _, cfg in rows):
    rows.append((*CONFIGURED, own))
  wanted = tuple(config.ablation.rows)
  known = [key for key, _, _ in rows]
  unknown = sorted(set(wanted) - set(known))
  if unknown:
    raise UserError(f"ablation.rows={wanted}: unknown {unknown}; use a subset of {known}")
  return [r for r in rows if not wanted or r[0] in wanted]


def ablation_seeds(config) -> list[int]:
  """The training seeds of every row: seed, seed + 1, ..., ablation.num_seeds of them."""
  n = int(config.ablation.num_seeds)
  if n < 1:
    raise UserError(f"ablation.num_seeds={n}: run each row with at least 1 seed (default 3)")
  return [int(config.seed) + i for i in range(n)]


def _row_seed(cfg, workdir) -> tuple[dict, float, bool]:
  """({split: {target: {metric: value}}}, seconds, reused) of one row and seed in its own
  workdir: train (resuming) and evaluate, or the stored result of a finished run of the same
  config (result.json), so that an interrupted ablation loses no finished run."""
  stored = epath.Path(workdir) / "result.json"
  settings = json.loads(cfg.to_json_best_effort())
  if stored.exists():
    done = json.loads(stored.read_text())
    if done["config"] == settings:
      return done["result"], done["seconds"], True
  t0 = time.time()
  train(cfg, workdir)
  res = evaluate(cfg, workdir)
  result = {
    sp: {t: {m: r.get(m) for m in ablation_lib.METRICS} for t, r in rs.items()}
    for sp, rs in res.items()
  }
  seconds = time.time() - t0
  if jax.process_index() == 0:
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(dict(config=settings, result=result, seconds=seconds)))
  return result, seconds, False


def ablation(config, workdir) -> list:
  """train_and_eval of each ablation row with each seed (workdir/ablation/<row>/seed_<s>);
  writes ablation.md and ablation.json (per-seed values, mean ± std, the components' verdicts,
  run times) and prints the table. Returns the rows' dicts."""
  seeds = ablation_seeds(config)
  plan = ablation_rows(config)
  rows, t0 = [], time.time()
  for key, name, cfg in plan:
    per_seed, seconds = {}, {}
    for seed in seeds:
      one = cfg.copy_and_resolve_references()
      one.seed = seed
      sub = str(epath.Path(workdir) / "ablation" / key / f"seed_{seed}")
      per_seed[seed], seconds[seed], reused = _row_seed(one, sub)
      if jax.process_index() == 0:
        how = "reused from result.json" if reused else f"{seconds[seed]:.0f} s"
        print(f"ablation: {name}, seed {seed}: {how}")
    summary = ablation_lib.summarize(per_seed)
    rows.append(dict(key=key, variant=name, per_seed=per_seed, seconds=seconds, summary=summary))
  components = ablation_lib.verdicts(rows)
  total = time.time() - t0
  world = synthetic.world_from_config(config.data.synthetic).changed()
  data = config.data.name + (
    f" (world {world})" if config.data.name == "synthetic" and world else ""
  )
  title = (
    f"Ablation on {data}: seeds {seeds}, {config.train.num_steps} steps per run; "
    f"{total:.0f} s on {machine.cpu_line()}"
  )
  text = ablation_lib.markdown(rows, components, title=title)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "ablation.md").write_text(text)
    table = dict(
      dataset=data,
      seeds=seeds,
      num_steps=int(config.train.num_steps),
      seconds=total,
      machine=machine.cpu_line(),
      rows=rows,
      components=components,
    )
    (epath.Path(workdir) / "ablation.json").write_text(json.dumps(table, indent=1))
    print(text)
  return rows


def run(mode, config, workdir):
  """Runs a launch.py mode; problems the user can fix surface as UserError (no traceback), and
  config values that cannot work as one ConfigError listing them all, before anything is read,
  generated or written.

  Returns None, after one line saying the run is incomplete, when a SIGTERM stopped it.
  """
  trains = mode != "eval"
  try:
    # First: a folder dataset's classes, prompts and max_classes, which all else reads.
    config = sources.configure(config)
  except DataError as e:
    raise UserError(str(e)) from e
  check_config(config, num_devices=jax.device_count() if trains else None)
  try:
    with sigterm_stops(f"--mode {mode}"):
      return _run(mode, config, workdir)
  except Preempted as e:
    if jax.process_index() == 0:
      print(
        f"SIGTERM: {e} stopped early; the run is incomplete. Training resumes from its latest "
        "checkpoint and evaluation restarts: rerun the same command.",
        flush=True,
      )
    return None
  except (
    DataError,
    FileNotFoundError,
    CheckpointMismatchError,
    CheckpointDamagedError,
    train_loop.NonFiniteError,
    demo.DemoError,
  ) as e:
    raise UserError(str(e)) from e


def _run(mode, config, workdir):
  t0 = time.time()
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  logging.info("mode=%s workdir=%s devices=%s", mode, workdir, jax.devices())
  if mode == "ablation":  # Bad rows or seeds stop the run before the demo's data is made.
    ablation_seeds(config)
    ablation_rows(config)
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
