"""The training loop: init or resume, step, log, evaluate, checkpoint, stop cleanly.

`train(config, workdir, task=..., frozen=..., make_iterator=...)` runs `config.train.num_steps`
updates of the task's trainable parameters, data parallel over every device (parameters
replicated, batch sharded). It resumes exactly from the latest checkpoint in `workdir`: same
parameters, optimizer state, PRNG key and step, and the data iterator restarted at that step
(`make_iterator(start_step)`; the data order is a pure function of (seed, step)).

Host-device syncs happen only at log steps (every train.log_every), evaluations and checkpoint
saves; the NaN guard is therefore checked there, from the sticky `TrainState.nonfinite_*` fields,
and a state that has seen a non-finite update is never checkpointed under nan_policy "halt".

Preemption: SIGTERM sets a flag; at the next step boundary (single process) or the next log step
(multi-process, where all processes agree on the step through an all-gather of the flag) the loop
saves a checkpoint, logs it and returns the state, so the caller can exit 0.

Multi-host: set train.distributed = True and call `initialize_distributed(config.train)` before
anything touches a jax device (launch.py does; train() calls it again, which is then a no-op).
`make_iterator` must yield this process's share of the batch (train.batch_size / process_count
rows). Only process 0 writes logs; all processes take part in checkpointing (orbax coordinates).
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

from ssr_jax.train.checkpoint import Checkpointer, abstract_state, config_json, restore_checked
from ssr_jax.train.metric_writer import MetricWriter, console_line, summarize
from ssr_jax.train.sharding import make_mesh, put_batch, replicated
from ssr_jax.train.state import TrainState, create_train_state, make_optimizer
from ssr_jax.train.step import FINITE_PREFIX, NAN_POLICIES, jit_train_step, nonfinite_terms

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """A loss or gradient became non-finite under train.nan_policy = "halt".

  step: the first bad step (the `step` the task's loss saw); terms: the non-finite quantities at
  that step ("loss", task metric names, "grads"); checkpoint_step: the latest checkpoint, which
  predates the bad update (None if there is none yet).
  """

  def __init__(self, step: int, terms: list[str], checkpoint_step: int | None, directory):
    self.step, self.terms, self.checkpoint_step = step, terms, checkpoint_step
    where = (
      f"the latest checkpoint, step {checkpoint_step} in {directory}, predates it and is intact"
      if checkpoint_step is not None
      else f"no checkpoint was saved yet in {directory}"
    )
    super().__init__(
      f"Non-finite {', '.join(terms)} at step {step} (train.nan_policy='halt'); {where}. "
      "Fix the cause, or rerun with train.nan_policy='skip' to skip such updates."
    )


def initialize_distributed(train_cfg) -> None:
  """`jax.distributed.initialize()` (cluster auto-detected) when train.distributed is set."""
  if train_cfg.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def validate_train_config(train_cfg, *, num_devices: int) -> None:
  """Clear errors for train.* values the loop cannot run with."""
  if train_cfg.nan_policy not in NAN_POLICIES:
    raise ValueError(f"train.nan_policy={train_cfg.nan_policy!r}: expected one of {NAN_POLICIES}.")
  if train_cfg.batch_size <= 0 or train_cfg.batch_size % num_devices:
    raise ValueError(
      f"train.batch_size={train_cfg.batch_size} must be a positive multiple of the number of "
      f"devices ({num_devices})."
    )
  for name in ("num_steps", "log_every"):
    if train_cfg[name] <= 0:
      raise ValueError(f"train.{name}={train_cfg[name]}: must be positive.")
  for name in ("checkpoint_every", "eval_every"):
    if train_cfg[name] < 0:
      raise ValueError(f"train.{name}={train_cfg[name]}: must be >= 0 (0 = off).")


class _SigtermFlag:
  """Context manager: while active, SIGTERM only sets `.requested` (main thread only)."""

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

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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
  initialize_distributed(tc)
  mesh = make_mesh() if mesh is None else mesh
  validate_train_config(tc, num_devices=mesh.size)
  workdir = epath.Path(workdir)
  is_main = jax.process_index() == 0
  repl = replicated(mesh)
  tx, schedule = make_optimizer(tc)
  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints)
  writer = None
  try:
    # ---------------------------------------------------------------- state: fresh or resumed
    start = ckpt.latest_step() or 0
    batches = iter(make_iterator(start))
    gbatch = put_batch(_next_batch(batches, start, tc.num_steps), mesh)
    _check_batch_size(gbatch, tc.batch_size)
    create = functools.partial(create_train_state, task, tx)
    rng = jax.random.PRNGKey(config.seed)
    if start:
      target = abstract_state(jax.eval_shape(create, rng, gbatch), repl)
      state = restore_checked(
        ckpt, target, step=start, config=config, clip_fingerprint=clip_fingerprint
      )
      if is_main:
        log.info("Resumed from %s at step %d.", ckpt.directory / str(start), start)
    else:
      # Parameters are created already replicated (no host copy, nothing to donate by mistake).
      state = jax.jit(create, out_shardings=repl)(rng, gbatch)
    frozen = jax.device_put(frozen, repl)
    step_fn = jit_train_step(task, tx, schedule=schedule, nan_policy=tc.nan_policy, mesh=mesh)
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
    config_record = config_json(config)

    def save(step, state, metrics=None):
      guard(state)
      meta = {
        "clip_fingerprint": clip_fingerprint,
        "jax_version": jax.__version__,
        "data_step": step,  # The data iterator restarts here: make_iterator(data_step).
        "seed": config.seed,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
      }
      ckpt.save(step, state, config={"config": config_record, "meta": meta}, metrics=metrics)

    metric_names = []

    def guard(state, *, fetched=None):
      """Raises NonFiniteError (halt) once the sticky flag is set; a rare host sync."""
      if tc.nan_policy != "halt":
        return
      if fetched is None:
        fetched = jax.device_get((state.nonfinite_step, state.nonfinite_mask))
      first, mask = fetched
      if first < 0:
        return
      ckpt.wait_until_finished()  # Let the last (good) save finish its rename.
      ckpt.reload()
      raise NonFiniteError(
        int(first), nonfinite_terms(mask, metric_names), ckpt.latest_step(), ckpt.directory
      )

    # ---------------------------------------------------------------- loop
    step = start
    pending = []
    seen_nonfinite = int(jax.device_get(state.nonfinite_count))
    timer_step, timer_start = step, time.perf_counter()
    with _SigtermFlag() as sigterm:
      while step < tc.num_steps:
        if gbatch is None:
          gbatch = put_batch(_next_batch(batches, step, tc.num_steps), mesh)
        state, metrics = step_fn(state, frozen, gbatch)
        gbatch = None
        step += 1
        pending.append(metrics)
        if step == start + 1:
          # Keep compilation out of the throughput figures.
          metric_names = sorted(metrics)
          jax.block_until_ready(metrics)
          timer_step, timer_start = step, time.perf_counter()
        stop = sigterm.requested if jax.process_count() == 1 else False

        if step % tc.log_every == 0 or step == tc.num_steps:
          fetched, flags = jax.device_get(
            (pending, (state.nonfinite_step, state.nonfinite_mask, state.nonfinite_count))
          )
          pending = []
          now = time.perf_counter()
          sps = (step - timer_step) / (now - timer_start) if step > timer_step else float("nan")
          scalars = summarize(fetched, skip_prefix=FINITE_PREFIX)
          if step > timer_step:  # No rate yet at a log step right after compilation.
            scalars["steps_per_sec"] = sps
            scalars["images_per_sec"] = sps * tc.batch_size
          if is_main:
            log.info(console_line(step, tc.num_steps, scalars, sps, tc.batch_size))
          writer.write_scalars(step, scalars)
          timer_step, timer_start = step, now
          guard(state, fetched=flags[:2])
          if flags[2] > seen_nonfinite:
            if is_main:
              log.warning(
                "Skipped %d update(s) with non-finite loss/gradients (first at step %d: %s).",
                flags[2] - seen_nonfinite,
                flags[0],
                ", ".join(nonfinite_terms(flags[1], metric_names)),
              )
            seen_nonfinite = flags[2]
          if jax.process_count() > 1:
            # All processes must stop at the same step: agree on the flag at this sync point.
            stop = bool(np.any(multihost_utils.process_allgather(np.int32(sigterm.requested))))

        eval_metrics = None
        if (
          eval_fn is not None
          and tc.eval_every
          and (step % tc.eval_every == 0 or step == tc.num_steps)
        ):
          guard(state)
          result = dict(eval_fn(state, step))
          images = result.pop("images", {})
          if "miou" not in result:
            raise KeyError(f"eval_fn returned {sorted(result)}; it must return 'miou'.")
          writer.write_scalars(step, result, kind="eval")
          writer.write_images(step, {f"eval/{k}": v for k, v in images.items()})
          if is_main:
            log.info(
              "eval step %d: %s", step, " ".join(f"{k} {float(v):.4f}" for k, v in result.items())
            )
          eval_metrics = {"miou": float(result["miou"])}
          timer_step, timer_start = step, time.perf_counter()

        if (
          (tc.checkpoint_every and step % tc.checkpoint_every == 0)
          or eval_metrics is not None
          or step == tc.num_steps
          or stop
        ):
          save(step, state, eval_metrics)
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
    ckpt.wait_until_finished()
    ckpt.close()
    if writer is not None:
      writer.close()
