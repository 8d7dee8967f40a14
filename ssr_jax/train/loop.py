"""The training loop: init or resume, step, log, evaluate, checkpoint, stop cleanly.

`train(config, workdir, task=..., frozen=..., make_iterator=...)` runs `config.train.num_steps`
updates of the task's trainable parameters, data parallel over every device (parameters
replicated, batch sharded). It resumes exactly from the latest checkpoint in `workdir`: same
parameters, optimizer state, PRNG key and step, and the data iterator restarted at that step
(`make_iterator(start_step)`; the data order is a pure function of (seed, step)).

`train` is a short driver over the top-level helpers below, in banner sections: input, state
(fresh or resumed), NaN guard, logging, eval, save, and the loop itself.

Host-device syncs happen only at log steps (every train.log_every), evaluations and checkpoint
saves. The NaN guard is checked there: the state's sticky `nonfinite_step` says whether (and at
which step) an update first went bad (a non-finite loss or gradient, or a non-finite value in the
params, model state, optimizer state or task-derived values it made; step.py), and that step's
`finite/*` measurements, kept on device until the next log step, say which terms. Under
nan_policy "halt" a state that has seen a bad update is never checkpointed, so every checkpoint
holds finite values only.

Preemption: SIGTERM sets a flag; at the next step boundary (single process) or the next log step
(multi-process, where all processes agree on the step through an all-gather of the flag) the loop
saves a checkpoint (skipping any evaluation due there, unless it is the last step), logs it and
returns the state, whose step is then short of train.num_steps, so the caller can exit 0.

Every exit, normal or not, ends the input iterator (`close()`: its threads, worker processes and
tf.data iterator) and waits for the checkpoint saves in flight before returning or raising.

Multi-host: the entry point (launch.py) calls `jax.distributed.initialize()` before anything
touches a jax device; train() assumes it is done. `make_iterator` must yield this process's share
of the batch (train.batch_size / process_count rows). Only process 0 writes logs and metrics; all
processes take part in checkpointing (orbax coordinates the save, so `save_checkpoint` is
collective).
"""

import functools
import logging
import signal
import threading
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from ssr_jax import config_check
from ssr_jax.train.checkpoint import (
  Checkpointer,
  abstract_state,
  config_json,
  restore_newest_intact,
)
from ssr_jax.train.metric_writer import MetricWriter, console_line, summarize
from ssr_jax.train.sharding import make_mesh, put_batch, replicated
from ssr_jax.train.state import TrainState, create_train_state, make_optimizer
from ssr_jax.train.step import (
  FINITE_PREFIX,
  JittedTrainStep,
  nonfinite_terms,
  update_skipped,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- errors, config checks, SIGTERM


class NonFiniteError(RuntimeError):
  """An update went bad under train.nan_policy = "halt": a non-finite loss or gradient, or a
  non-finite value in the state it made (step.py's guard).

  step: the first bad step (the `step` the task's loss saw); terms: the non-finite quantities at
  that step ("loss", task metric names, "grads", "state/params", "state/tau", ...);
  checkpoint_step: the latest checkpoint, which predates the bad update and, like every saved
  state, passed the guard (None if there is none yet).
  """

  def __init__(self, step: int, terms: list[str], checkpoint_step: int | None, directory):
    self.step, self.terms, self.checkpoint_step = step, terms, checkpoint_step
    where = (
      f"the last good checkpoint is step {checkpoint_step} in {directory}"
      if checkpoint_step is not None
      else f"no checkpoint was saved yet in {directory}"
    )
    super().__init__(
      f"Non-finite {', '.join(terms)} at step {step} (train.nan_policy='halt'); {where}. "
      "Fix the cause, or rerun with train.nan_policy='skip' to skip such updates."
    )


class _SigtermFlag:
  """Context manager: while active, SIGTERM only sets `.requested` (main thread only).

  On a normal exit after a SIGTERM, the previous handler, if a Python one, is then called, so the
  caller's own SIGTERM handling (experiment.py's: stop, report the run incomplete) follows the
  loop's save.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    else:
      log.warning("train() is not on the main thread: SIGTERM will not trigger a clean stop.")
    return self

  def __exit__(self, exc_type, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      if self.requested and exc_type is None and callable(self._previous):
        self._previous(signal.SIGTERM, None)


# ---------------------------------------------------------------- input


def _close(batches) -> None:
  """Ends an input iterator now (its threads, processes, tf.data iterator), not at interpreter
  shutdown, where tf.data's would hang the exit."""
  close = getattr(batches, "close", None)
  if close is not None:
    close()


def _next_batch(batches, step: int, num_steps: int):
  try:
    return next(batches)
  except StopIteration:
    raise RuntimeError(
      f"The training iterator ended before step {step}; make_iterator must yield a batch for every "
      f"step up to train.num_steps ({num_steps})."
    ) from None


def _check_batch_size(gbatch, batch_size: int) -> None:
  got = jax.tree.leaves(gbatch)[0].shape[0]
  if got != batch_size:
    raise ValueError(
      f"make_iterator yields a global batch of {got} ({got // jax.process_count()} per process) "
      f"but train.batch_size is {batch_size}: build the iterator with "
      "batch_size=train.batch_size // jax.process_count()."
    )


# ---------------------------------------------------------------- state: fresh or resumed


def init_or_resume(
  task, tx, gbatch, *, ckpt: Checkpointer, config, clip_fingerprint: str, mesh
) -> tuple[TrainState, int]:
  """(state, step): a fresh state at step 0 when `ckpt` has no checkpoint, else the newest intact
  checkpoint (damaged newer ones moved aside: checkpoint.restore_newest_intact), replicated on
  `mesh`.

  gbatch: a global batch (its shapes define the state's). The resumed state is checked against
  the checkpoint (config fields named on a mismatch; a CLIP fingerprint change warns).
  """
  create = functools.partial(create_train_state, task, tx)
  rng = jax.random.PRNGKey(config.seed)
  repl = replicated(mesh)
  if ckpt.latest_step() is None:
    # Parameters are created already replicated (no host copy, nothing to donate by mistake).
    return jax.jit(create, out_shardings=repl)(rng, gbatch), 0
  target = abstract_state(jax.eval_shape(create, rng, gbatch), repl)
  state, start = restore_newest_intact(
    ckpt, target, config=config, clip_fingerprint=clip_fingerprint
  )
  if jax.process_index() == 0:
    log.info("Resumed from %s at step %d.", ckpt.directory / str(start), start)
  return state, start


# ---------------------------------------------------------------- NaN guard


def halt_if_nonfinite(
  state: TrainState, pending: list, *, step: int, nan_policy: str, ckpt: Checkpointer
) -> None:
  """Under nan_policy "halt", raises NonFiniteError once the state's sticky flag is set.

  pending: the measurements of the steps since the last log step (device or host dicts), the
  last one from step `step - 1`. Every check (log, eval, save) sees the steps since the previous
  one, so the first bad step is among them and its `finite/*` flags name the bad terms.
  A host sync; all processes hold the same flag, so all raise together.
  """
  if nan_policy != "halt":
    return
  bad = int(jax.device_get(state.nonfinite_step))
  if bad < 0:
    return
  first = step - len(pending)
  if first <= bad < step:
    terms = nonfinite_terms(jax.device_get(pending[bad - first]))
  else:  # Not reached from train(): a state restored with the flag already set.
    terms = ["loss or gradients"]
  ckpt.wait_until_finished()  # Let the last (good) save finish its rename.
  ckpt.reload()
  raise NonFiniteError(bad, terms, ckpt.latest_step(), ckpt.directory)


def warn_skipped(measurements: list[dict], *, first_step: int) -> None:
  """Warns (process 0) about the updates of a log interval skipped under nan_policy "skip".

  measurements: host dicts of the interval's steps, the first from step `first_step`.
  """
  skipped = [i for i, m in enumerate(measurements) if update_skipped(m)]
  if skipped and jax.process_index() == 0:
    log.warning(
      "Skipped %d bad update(s) (non-finite values; first at step %d: %s).",
      len(skipped),
      first_step + skipped[0],
      ", ".join(nonfinite_terms(measurements[skipped[0]])),
    )


# ---------------------------------------------------------------- logging


class Throughput:
  """Steps per second since the last restart (end of compilation, a log step or an eval)."""

  def __init__(self, step: int):
    self.restart(step)

  def restart(self, step: int, now: float | None = None) -> None:
    self.step, self.start = step, (time.perf_counter() if now is None else now)


def log_interval(
  writer: MetricWriter,
  measurements: list[dict],
  *,
  step: int,
  num_steps: int,
  batch_size: int,
  timer: Throughput,
) -> None:
  """Writes the interval's mean scalars and throughput, logs the console line (process 0)."""
  now = time.perf_counter()
  sps = (step - timer.step) / (now - timer.start) if step > timer.step else float("nan")
  scalars = summarize(measurements, skip_prefix=FINITE_PREFIX)
  if step > timer.step:  # No rate yet at a log step right after compilation.
    scalars["steps_per_sec"] = sps
    scalars["images_per_sec"] = sps * batch_size
  if jax.process_index() == 0:
    log.info(console_line(step, num_steps, scalars, sps, batch_size))
  writer.write_scalars(step, scalars)
  timer.restart(step, now)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is set on any (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


# ---------------------------------------------------------------- eval


def evaluate_and_log(eval_fn, state: TrainState, *, step: int, writer: MetricWriter) -> dict:
  """Runs `eval_fn(state, step)`, writes its scalars and images; returns {"miou": float}."""
  result = dict(eval_fn(state, step))
  images = result.pop("images", {})
  if "miou" not in result:
    raise KeyError(f"eval_fn returned {sorted(result)}; it must return 'miou'.")
  writer.write_scalars(step, result, kind="eval")
  writer.write_images(step, {f"eval/{k}": v for k, v in images.items()})
  if jax.process_index() == 0:
    log.info("eval step %d: %s", step, " ".join(f"{k} {float(v):.4f}" for k, v in result.items()))
  return {"miou": float(result["miou"])}


# ---------------------------------------------------------------- save


def save_checkpoint(
  ckpt: Checkpointer,
  state: TrainState,
  *,
  step: int,
  config_record: dict,
  seed: int,
  clip_fingerprint: str,
  metrics: dict | None = None,
) -> None:
  """Starts an (async) save of `state` as `step`, with the config and run metadata.

  Collective: every process calls it (orbax coordinates the write). metrics: {"miou": ...} for an
  evaluated state (best-checkpoint retention).
  """
  meta = {
    "clip_fingerprint": clip_fingerprint,
    "jax_version": jax.__version__,
    "data_step": step,  # The data iterator restarts here: make_iterator(data_step).
    "seed": seed,
    "device_count": jax.device_count(),
    "process_count": jax.process_count(),
  }
  ckpt.save(step, state, config={"config": config_record, "meta": meta}, metrics=metrics)


# ---------------------------------------------------------------- the loop


def _every(step: int, period: int) -> bool:
  return period > 0 and step % period == 0


def train(
  config,
  workdir,
  *,
  task,
  frozen,
  make_iterator,
  eval_fn=None,
  clip_fingerprint: str = "",
  mesh=None,
) -> TrainState:
  """Trains (or resumes) to config.train.num_steps; returns the final state (or the state saved
  at a SIGTERM stop, whose step is then < num_steps).

  task: has `init(rng, batch)` and `loss(params, frozen, batch, *, step, rng)` (see step.py).
  frozen: pytree passed to every step, replicated, never trained or checkpointed.
  make_iterator(start_step): iterator of per-process numpy batch dicts from `start_step` on.
  eval_fn(state, step) -> {"miou": float, "images": {name: uint8 image}, other scalars...}: run
    every train.eval_every steps and at the end; each evaluated state is checkpointed with its
    mIoU (best-checkpoint retention).
  clip_fingerprint: identifies the frozen weights; stored in checkpoint metadata.
  mesh: defaults to `make_mesh()` over all devices.
  Raises NonFiniteError under nan_policy "halt" (the latest checkpoint then predates the bad step).
  """
  tc = config.train
  mesh = make_mesh() if mesh is None else mesh
  found = config_check.train_problems(tc, num_devices=mesh.size)
  if found:
    raise config_check.ConfigError(found)
  workdir = epath.Path(workdir)
  is_main = jax.process_index() == 0
  tx, schedule = make_optimizer(tc)
  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints)
  writer = batches = None
  # From here on (set-up, loop, clean-up), SIGTERM means: finish the step, save, stop.
  with _SigtermFlag() as sigterm:
    try:
      # -------------------------------------------------------------- state: fresh or resumed
      latest = ckpt.latest_step() or 0
      batches = iter(make_iterator(latest))
      gbatch = put_batch(_next_batch(batches, latest, tc.num_steps), mesh)
      _check_batch_size(gbatch, tc.batch_size)
      state, start = init_or_resume(
        task,
        tx,
        gbatch,
        ckpt=ckpt,
        config=config,
        clip_fingerprint=clip_fingerprint,
        mesh=mesh,
      )
      if start != latest:  # The latest checkpoint was damaged: the data restarts further back.
        _close(batches)
        batches = iter(make_iterator(start))
        gbatch = put_batch(_next_batch(batches, start, tc.num_steps), mesh)
      frozen = jax.device_put(frozen, replicated(mesh))
      step_fn = JittedTrainStep(task, tx, schedule=schedule, nan_policy=tc.nan_policy, mesh=mesh)
      writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
      save = functools.partial(
        save_checkpoint,
        ckpt,
        config_record=config_json(config),
        seed=config.seed,
        clip_fingerprint=clip_fingerprint,
      )
      guard = functools.partial(halt_if_nonfinite, nan_policy=tc.nan_policy, ckpt=ckpt)

      # -------------------------------------------------------------- loop
      step, pending, timer = start, [], Throughput(start)  # pending: measurements not yet logged
      while step < tc.num_steps:
        if gbatch is None:
          gbatch = put_batch(_next_batch(batches, step, tc.num_steps), mesh)
        state, measurements = step_fn(state, frozen, gbatch)
        gbatch = None
        step += 1
        pending.append(measurements)
        if step == start + 1:
          jax.block_until_ready(measurements)  # Keep compilation out of the throughput figures.
          timer.restart(step)
        # Several processes agree on a stop only at log steps (a collective).
        stop = sigterm.requested and jax.process_count() == 1
        last = step == tc.num_steps

        # logging (and the NaN guard and the multi-process stop, at this sync point)
        if _every(step, tc.log_every) or last:
          fetched, pending = jax.device_get(pending), []
          log_interval(
            writer,
            fetched,
            step=step,
            num_steps=tc.num_steps,
            batch_size=tc.batch_size,
            timer=timer,
          )
          guard(state, fetched, step=step)
          warn_skipped(fetched, first_step=step - len(fetched))
          stop = any_process(sigterm.requested)

        # eval (not on the way out of a preemption: the grace period is for the save)
        eval_metrics = None
        evaluate = eval_fn is not None and tc.eval_every > 0 and not (stop and not last)
        if evaluate and (_every(step, tc.eval_every) or last):
          guard(state, pending, step=step)
          eval_metrics = evaluate_and_log(eval_fn, state, step=step, writer=writer)
          timer.restart(step)  # Keep eval time out of the throughput figures.

        # save (never a state past a non-finite update under "halt")
        if _every(step, tc.checkpoint_every) or last or eval_metrics is not None or stop:
          guard(state, pending, step=step)
          save(state, step=step, metrics=eval_metrics)
        if stop:
          if is_main:
            log.info(
              "SIGTERM: saved a checkpoint at step %d in %s; stopping cleanly.",
              step,
              ckpt.directory,
            )
          break
      if is_main:
        log.info("Train step compiled %d time(s).", step_fn.trace_count)
      return state
    finally:
      if batches is not None:
        _close(batches)
      ckpt.wait_until_finished()
      ckpt.close()
      if writer is not None:
        writer.close()
