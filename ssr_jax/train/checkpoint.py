"""Orbax checkpoints under `workdir/checkpoints/<step>/`.

Each step directory holds two items: `state` (the TrainState, saved with StandardSave) and `config`
(JSON: the run's config plus metadata: CLIP weights fingerprint, jax version, data position).
Frozen CLIP weights are never saved.

Retention: the last `keep` checkpoints, plus the one with the best eval mIoU (steps saved with
`metrics={"miou": ...}`); a checkpoint without metrics survives only while it is among the last
`keep`. Both rules are one orbax preservation policy, re-evaluated after every save, and the
metrics live inside each step directory, so the best checkpoint also survives restarts.

Atomicity: orbax writes a step to `<step>.orbax-checkpoint-tmp*` and renames it when complete; a
save killed before the rename leaves only that temporary directory, which `latest_step` and
`restore` never consider and the next (writable) manager deletes.

Damage (a bad disk, a file truncated or deleted after the save): a resume restores the newest
checkpoint that reads back whole (`restore_newest_intact`); each newer, damaged one is moved, never
deleted, to `checkpoints/corrupt/<step>-<what>`, with one log line naming it and why. A damaged
checkpoint is one whose files are missing or unparsable (`damage`) or whose arrays cannot be read;
a readable checkpoint of another model stays a CheckpointMismatchError (nothing is moved).
"""

import contextlib
import json
import logging
import os
import re

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt"  # Under CHECKPOINT_SUBDIR: damaged checkpoints moved aside.
BEST_METRIC = "miou"
# Files every checkpoint has (JSON ones parsed), then the OCDBT root of an OCDBT-format state.
_JSON_FILES = ("state/_METADATA", "config/metadata")
_OCDBT_MANIFEST = "state/manifest.ocdbt"


class CheckpointMismatchError(ValueError):
  """The saved state's tree does not match the target's (a different model config)."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint cannot be read back: files missing, truncated or unparsable."""


def damage(step_dir) -> tuple[str, str] | None:
  """(tag, reason) when a step directory's files show it cannot be a whole checkpoint, else None.

  tag: a short name for directory names ("missing-state-METADATA"); reason: for people ("state/
  _METADATA is missing"). Checks presence and JSON syntax only (milliseconds); truncated array
  data shows when it is read.
  """
  step_dir = epath.Path(step_dir)
  needed = list(_JSON_FILES)
  if any((step_dir / "state").glob("ocdbt.process_*")):
    needed.append(_OCDBT_MANIFEST)
  for rel in needed:
    name = re.sub(r"[^A-Za-z0-9.]+", "-", rel).strip("-")
    path = step_dir / rel
    if not path.exists():
      return f"missing-{name}", f"{rel} is missing"
    if rel in _JSON_FILES:
      try:
        json.loads(path.read_text())
      except (ValueError, UnicodeDecodeError) as e:
        return f"unparsable-{name}", f"{rel} is not valid JSON ({e})"
  return None


def _unreadable(e: Exception, limit: int = 200) -> tuple[str, str]:
  """damage()'s (tag, reason) for a checkpoint whose arrays fail to read with `e`."""
  line = (str(e).strip().splitlines() or [type(e).__name__])[0]
  line = line if len(line) <= limit else line[: limit - 3] + "..."
  return "unreadable-state", f"its arrays cannot be read: {line}"


class _NoMissingMetricsWarning(logging.Filter):
  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


@contextlib.contextmanager
def _quiet_missing_metrics():
  """Orbax warns at every save without metrics once best_fn is set; here that is the norm."""
  absl_logger, quiet = logging.getLogger("absl"), _NoMissingMetricsWarning()
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


def checkpoint_dir(workdir) -> epath.Path:
  # Orbax's OCDBT store rejects relative paths; remote paths (gs://...) are kept as given.
  local = "://" not in str(workdir)
  return epath.Path(os.path.abspath(workdir) if local else workdir) / CHECKPOINT_SUBDIR


def _best_metric(metrics) -> float:
  return float(metrics[BEST_METRIC])


def _path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(k))
  return "/".join(parts)


def _flat_shapes(tree) -> dict[str, tuple]:
  is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {_path_str(p): tuple(x.shape) for p, x in flat}


def check_compatible(saved_tree, target, *, where: str = "checkpoint") -> None:
  """Raises CheckpointMismatchError naming every differing path (and both shapes) between the
  saved array metadata tree and the target pytree; paths are like "params/decoder/kernel"."""
  saved, want = _flat_shapes(saved_tree), _flat_shapes(target)
  problems = []
  for path in sorted(set(saved) | set(want)):
    if path not in saved:
      problems.append(f"  {path}: missing from the checkpoint (model expects {want[path]})")
    elif path not in want:
      problems.append(f"  {path}: in the checkpoint {saved[path]} but not in the model")
    elif saved[path] != want[path]:
      problems.append(f"  {path}: checkpoint shape {saved[path]} vs model shape {want[path]}")
  if problems:
    shown = problems[:20] + ([f"  ... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise CheckpointMismatchError(
      f"{where} does not match the model being restored ({len(problems)} difference(s)):\n"
      + "\n".join(shown)
      + "\nThe model config, or the ssr_jax version, differs from the one that wrote the "
      "checkpoint (its `config` item holds that config): use the same config and version, or a "
      "fresh workdir."
    )


def abstract_state(tree, sharding=None):
  """ShapeDtypeStruct pytree with a sharding per leaf: `sharding` if given, else the leaf's own.

  Restoring onto it places every array directly with that sharding, so a checkpoint written on N
  devices restores onto a mesh of any other size.
  """

  def leaf(x):
    s = sharding if sharding is not None else getattr(x, "sharding", None)
    if s is None:
      raise ValueError("abstract_state: a leaf has no sharding; pass sharding=...")
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  return jax.tree.map(leaf, tree)


class Checkpointer:
  """CheckpointManager for one workdir with the retention rules of the module docstring.

  keep: how many of the most recent checkpoints to keep (train.keep_checkpoints, >= 1).
  read_only: open existing checkpoints for restore only (evaluation); the directory must exist.
  async_save: save in a background thread (the arrays are copied to host before `save` returns,
    so the caller may donate or overwrite them right away).
  """

  def __init__(self, workdir, *, keep: int = 3, read_only: bool = False, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints={keep}: must be at least 1.")
    self.directory = checkpoint_dir(workdir)
    if read_only and not self.directory.exists():
      raise FileNotFoundError(
        f"No checkpoint directory {self.directory}: train into this workdir first, or pass the "
        "workdir of a finished run."
      )
    policy = policies.AnyPreservationPolicy(
      [
        policies.LatestN(n=keep),
        # The single best by mIoU; checkpoints without metrics are left to LatestN.
        policies.BestN(
          get_metric_fn=_best_metric, reverse=False, n=1, keep_checkpoints_without_metrics=False
        ),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      best_fn=_best_metric,  # Makes the manager store per-step metrics and answer best_step().
      best_mode="max",
      preservation_policy=policy,
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save,
      read_only=read_only,
      create=not read_only,
      save_interval_steps=0 if read_only else 1,
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
      options=options,
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Step with the highest saved mIoU, or None if no checkpoint has metrics."""
    if all(self._manager.metrics(s) is None for s in self.all_steps()):
      return None
    return self._manager.best_step()

  def save(self, step: int, state, *, config: dict, metrics: dict | None = None) -> bool:
    """Starts saving `state` (and the JSON-serialisable `config` dict) as step `step`.

    metrics: {"miou": float} for an evaluated state (takes part in best-checkpoint retention).
    Returns False (and saves nothing) if that step is already saved.
    """
    if step in self._manager.all_steps():
      return False
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
    with _quiet_missing_metrics() if metrics is None else contextlib.nullcontext():
      return bool(self._manager.save(step, args=args, metrics=metrics, force=True))

  def _resolve(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"No finished checkpoint in {self.directory}.")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(
        f"No checkpoint for step {step} in {self.directory}; available steps: {steps}."
      )
    return step

  def restore(self, target, *, step: int | None = None):
    """The saved state of `step` (default: latest) with the structure and shardings of `target`.

    target: a TrainState of arrays or of ShapeDtypeStructs with shardings (see abstract_state).
    Raises FileNotFoundError if there is no such checkpoint and CheckpointMismatchError (naming
    each differing parameter path and both shapes) if the saved tree differs from the target.
    """
    step = self._resolve(step)
    saved = self._manager.item_metadata(step)["state"]
    check_compatible(
      getattr(saved, "tree", saved), target, where=f"Checkpoint {self.directory / str(step)}"
    )
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state(target)))
    )
    return restored.state

  def read_config(self, *, step: int | None = None) -> dict:
    """The `config` item of `step` (default: latest): {"config": {...}, "meta": {...}}."""
    step = self._resolve(step)
    return self._manager.restore(
      step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
    ).config

  def metrics(self, step: int) -> dict | None:
    return self._manager.metrics(step)

  def wait_until_finished(self) -> None:
    """Blocks until pending async saves are written and renamed into place."""
    self._manager.wait_until_finished()

  def reload(self) -> None:
    """Re-reads the directory (after another process wrote to it)."""
    self._manager.reload()

  def move_aside(self, step: int, tag: str) -> epath.Path:
    """Moves checkpoint `step` to `corrupt/<step>-<tag>` (never over an earlier one); returns
    the new path. Process 0 moves it; collective (every process calls it)."""
    root = self.directory / CORRUPT_SUBDIR
    dest, n = root / f"{step}-{tag}", 1
    while dest.exists():
      n += 1
      dest = root / f"{step}-{tag}-{n}"
    if jax.process_index() == 0:
      root.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(dest)
    multihost_utils.sync_global_devices(f"ssr_jax moved checkpoint {step} aside")
    self.reload()
    return dest

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_json(config) -> dict:
  """The ConfigDict as a JSON-serialisable dict (what a checkpoint's `config` item records)."""
  return json.loads(config.to_json_best_effort())


def config_diff(saved: dict, current: dict) -> list[str]:
  """One line per dotted config field that differs between two `config_json` dicts."""
  a, b = _flatten(saved), _flatten(current)
  return [
    f"  {k}: checkpoint {a.get(k, '<absent>')!r} vs now {b.get(k, '<absent>')!r}"
    for k in sorted(set(a) | set(b))
    if a.get(k) != b.get(k)
  ]


def restore_checked(ckpt: Checkpointer, target, *, step: int, config, clip_fingerprint: str):
  """`ckpt.restore(target, step=step)` for a resume: warns if the frozen CLIP weights changed, and
  adds the config fields that differ from the checkpoint's to a CheckpointMismatchError."""
  saved = ckpt.read_config(step=step)
  meta = saved.get("meta", {})
  if meta.get("clip_fingerprint", "") != clip_fingerprint:
    log.warning(
      "Resuming with different frozen CLIP weights: checkpoint fingerprint %r, now %r.",
      meta.get("clip_fingerprint"),
      clip_fingerprint,
    )
  try:
    return ckpt.restore(target, step=step)
  except CheckpointMismatchError as e:
    diff = config_diff(saved.get("config", {}), config_json(config))
    raise CheckpointMismatchError(
      f"{e}\nConfig fields that differ from the checkpoint's:\n" + ("\n".join(diff) or "  (none)")
    ) from None


def restore_newest_intact(ckpt: Checkpointer, target, *, config, clip_fingerprint: str):
  """(state, step) of the newest checkpoint that restores whole (see restore_checked).

  The damaged ones newer than it are moved aside (`Checkpointer.move_aside`), each with one
  warning line naming it and why. Raises CheckpointDamagedError, moving nothing, if none restores
  (nothing to resume from, and the user may still recover them), FileNotFoundError if there is no
  checkpoint, and CheckpointMismatchError if the newest readable one is of another model.
  """
  damaged = []
  for step in reversed(ckpt.all_steps()):
    problem = damage(ckpt.directory / str(step))
    if problem is None:
      try:
        state = restore_checked(
          ckpt, target, step=step, config=config, clip_fingerprint=clip_fingerprint
        )
      except CheckpointMismatchError:
        raise
      except Exception as e:  # TensorStore and orbax raise plain ValueError/Exception.
        problem = _unreadable(e)
    if problem is None:
      for bad, (tag, why) in damaged:
        dest = ckpt.move_aside(bad, tag)
        log.warning(
          "Checkpoint %s is damaged (%s): moved it to %s, resuming from step %d.",
          ckpt.directory / str(bad),
          why,
          dest,
          step,
        )
      return state, step
    damaged.append((step, problem))
  if not damaged:
    raise FileNotFoundError(f"No finished checkpoint in {ckpt.directory}.")
  listed = "; ".join(f"{s}: {why}" for s, (_, why) in damaged)
  raise CheckpointDamagedError(
    f"No intact checkpoint in {ckpt.directory} ({listed}). Nothing was moved or deleted: restore "
    f"them from a copy, or move them into {ckpt.directory / CORRUPT_SUBDIR} to start over."
  )


def restore(workdir, target_state, *, step: int | None = None):
  """Restores a TrainState from `workdir/checkpoints` onto the target's structure and shardings.

  See Checkpointer.restore; opens the directory read-only (FileNotFoundError if it is missing).
  """
  with Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.restore(target_state, step=step)


def restore_variables(workdir, target, *, step: int | None = None):
  """(variables, step): the params and the named collections of the TrainState saved at `step`
  (default: latest), nothing else.

  target: Flax-style variables {"params": ..., collection: ...} (arrays or ShapeDtypeStructs,
  e.g. jax.eval_shape of task.init, with only the collections wanted); "params" maps to the
  state's `params`, every other collection to `model_state/<collection>`. The saved tree is read
  with the checkpoint's own metadata, so nothing else of the training state (optimizer,
  schedule, NaN guard, CMPA's bank) has to be rebuilt or match: evaluation with another
  `train.grad_clip` or optimizer setting restores the same variables. Each wanted subtree is
  checked against the target, with CheckpointMismatchError naming each differing path. A leaf
  restores with its own sharding, or replicated over this process's devices when it has none.
  """
  with Checkpointer(workdir, read_only=True) as ckpt:
    step = ckpt._resolve(step)
    path = ckpt.directory / str(step) / "state"
    problem = damage(path.parent)
    if problem is None:
      try:
        saved = ckpt._manager.item_metadata(step)["state"]
      except Exception as e:  # TensorStore and orbax raise plain ValueError/Exception.
        problem = _unreadable(e)
  where = f"Checkpoint {path.parent}"
  if problem is not None:
    raise _damaged_for_eval(where, problem[1])
  saved = getattr(saved, "tree", saved)
  local = jax.sharding.NamedSharding(
    jax.sharding.Mesh(jax.local_devices(), ("data",)), jax.sharding.PartitionSpec()
  )

  def abstract(tree):
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None) or local
      ),
      tree,
    )

  item = {}
  for name, sub in target.items():
    saved_sub = saved.get("params") if name == "params" else saved.get("model_state", {}).get(name)
    if saved_sub is None:
      raise CheckpointMismatchError(
        f"{where} holds no `{name}` (saved keys: {sorted(saved)}; model_state: "
        f"{sorted(saved.get('model_state') or {})})"
      )
    check_compatible(saved_sub, sub, where=where)
    if name == "params":
      item["params"] = abstract(sub)
    else:
      item.setdefault("model_state", {})[name] = abstract(sub)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
      path,
      args=ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,  # Reads these subtrees only: no optimizer state is loaded or needed.
      ),
    )
  except Exception as e:  # TensorStore and orbax raise plain ValueError/Exception.
    raise _damaged_for_eval(where, _unreadable(e)[1]) from None
  out = {"params": restored["params"]} if "params" in target else {}
  out.update(restored.get("model_state", {}))
  return out, int(step)


def _damaged_for_eval(where: str, why: str) -> CheckpointDamagedError:
  return CheckpointDamagedError(
    f"{where} is damaged ({why}): evaluate another step with --config.eval.checkpoint_step=STEP, "
    "or rerun training, which moves it aside and resumes from the newest intact one."
  )
