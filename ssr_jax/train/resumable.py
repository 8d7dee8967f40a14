"""Resumable encoder pretraining: the tiny CLIP's and tiny DINO's loops checkpoint their whole
state with Orbax, and the same command rerun continues from the latest checkpoint.

A pretraining loop whose every step is a pure function of (seed, step) continues bit-identically
from a restored state. The settings its weights depend on (a JSON-able dict) are stored with each
checkpoint, and a rerun with other settings is refused before any step.
"""

import json
import logging
import time

from ssr_jax.train import checkpoint

log = logging.getLogger(__name__)


class Resumable:
  """Orbax checkpoints of one pretraining run under workdir/checkpoints (the latest 2 kept).

  `Resumable(workdir, state, settings=..., what="tiny DINO pretraining")` opens (or creates) the
  run: `.start` is the step to continue from (0 for a fresh run) and `.state` the restored state
  (the given one when fresh); `.seconds` and `.loss` are the time spent and the last logged loss
  of the runs before. `save(step, state, loss)` writes a checkpoint; `close()` waits for the
  writes (a killed run keeps every checkpoint it started). Raises ValueError, before any step,
  when the checkpoints hold a run with other settings.
  """

  def __init__(self, workdir, state, *, settings: dict, what: str):
    self.settings = json.loads(json.dumps(settings))  # As the checkpoint stores it.
    self.ckpt = checkpoint.Checkpointer(workdir, keep=2)
    self.start, self.state, self.seconds, self.loss = 0, state, 0.0, float("nan")
    self._t0 = time.time()
    start = self.ckpt.latest_step() or 0
    if not start:
      return
    saved = self.ckpt.read_config(step=start)
    old = saved["settings"]
    diff = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
    if diff:
      self.ckpt.close()
      raise ValueError(
        f"{self.ckpt.directory} holds a {what} with other {', '.join(diff)}: rerun with the "
        "same settings to resume, or use a fresh workdir"
      )
    self.state = self.ckpt.restore(state, step=start)
    self.start, self.seconds, self.loss = start, saved["seconds"], saved["loss"]
    log.info("%s resumed at step %d from %s", what, start, self.ckpt.directory)

  def elapsed(self) -> float:
    """Seconds of pretraining over every run so far."""
    return self.seconds + time.time() - self._t0

  def save(self, step: int, state, loss: float) -> None:
    config = dict(settings=self.settings, seconds=self.elapsed(), loss=loss)
    self.ckpt.save(step, state, config=config)

  def close(self) -> None:
    self.ckpt.wait_until_finished()
    self.ckpt.close()
