"""Fault injection for tests/test_faults.py: launch.py's main in this process, with one fault.

  python -m tests.fault_hooks FAULT[=ARG ...] -- LAUNCH_ARGS ...

Faults (deterministic points, unlike a timer):
  sigkill_at=STEP / sigterm_at=STEP: this process gets SIGKILL / SIGTERM while the training
    loop fetches the batch of that global step;
  sigkill_in_save=STEP: SIGKILL once checkpoint STEP is completely written, just before orbax
    renames it into place (the last moment of a save);
  sigterm_in_eval: SIGTERM as the first evaluation starts;
  sigterm_in_prepare: SIGTERM as the demo's data preparation starts;
  slow_input=SECONDS: every example of the input stream takes that long to be produced, so the
    input pipeline always has work in flight when the process ends.
"""

import os
import signal
import sys
import time


def _at_step(step: int, action) -> None:
  from ssr_jax import experiment

  make_batches = experiment.batches

  def batches(config):
    make_iterator = make_batches(config)

    def faulty(start):
      it = make_iterator(start)

      def gen():
        try:
          for s, batch in enumerate(it, start):
            if s == step:
              action()
            yield batch
        finally:
          it.close()

      return gen()

    return faulty

  experiment.batches = batches


def _kill(sig):
  return lambda: os.kill(os.getpid(), sig)


def _in_save(step: int) -> None:
  from orbax.checkpoint._src.path import atomicity

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def killing_finalize(self):
    if self.get_final().name == str(step):
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize


def _sigterm_on_call(module, name: str) -> None:
  fn = getattr(module, name)

  def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return fn(*args, **kwargs)

  setattr(module, name, signalled)


def _slow_input(seconds: float) -> None:
  from ssr_jax.data.examples import TrainSource

  draws = TrainSource.draws

  def slow(self, position):
    time.sleep(seconds)
    return draws(self, position)

  TrainSource.draws = slow


def install(fault: str) -> None:
  name, _, arg = fault.partition("=")
  if name == "sigkill_at":
    _at_step(int(arg), _kill(signal.SIGKILL))
  elif name == "sigterm_at":
    _at_step(int(arg), _kill(signal.SIGTERM))
  elif name == "sigkill_in_save":
    _in_save(int(arg))
  elif name == "sigterm_in_eval":
    from ssr_jax.eval import run

    _sigterm_on_call(run, "evaluate")
  elif name == "sigterm_in_prepare":
    from ssr_jax import demo

    _sigterm_on_call(demo, "prepare")
  elif name == "slow_input":
    _slow_input(float(arg))
  else:
    raise SystemExit(f"unknown fault {fault!r}")


def main(argv) -> None:
  split = argv.index("--")
  for fault in argv[:split]:
    install(fault)
  from absl import app

  import launch

  sys.argv = ["launch.py", *argv[split + 1 :]]
  app.run(launch.main, flags_parser=launch._parse_flags)


if __name__ == "__main__":
  main(sys.argv[1:])
