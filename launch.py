"""ssr_jax entry point: `python launch.py --config configs/voc.py --workdir runs/voc [--mode ...]`.

Flags, process set-up and logging; the work is in ssr_jax.experiment. Config fields can be
overridden on the command line, e.g. `--config.train.num_steps=100
--config.clip.weights=/path/to/clip-vit-base-patch16`.

Several hosts (a Cloud TPU pod, a SLURM or Open MPI job, or processes started by hand) need
`--config.train.distributed=True`: the distributed system is initialised here, before anything
touches a device (jax refuses afterwards).

The process always ends: after the work (done, failed, or stopped by SIGTERM), the input
pipelines are already closed and the checkpoint saves finished, and if the way out (thread joins,
exit handlers, interpreter shutdown) still takes more than EXIT_GRACE_S, the thread stacks are
printed and the process exits with status 1.
"""

import difflib
import faulthandler
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_GCE_CHECK", "true")

import logging as pylogging  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ("train", "eval", "train_and_eval", "ablation")
EXIT_GRACE_S = 30.0

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def _leaves(d, prefix=""):
  for k, v in d.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    yield f"{prefix}{k}"


def override_error(argv) -> str | None:
  """One line naming the first `--config.FIELD` of argv that the config does not declare."""
  path, overrides = None, []
  for i, arg in enumerate(argv):
    name = arg.split("=", 1)[0]
    if name == "--config":
      path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
    elif name.startswith("--config."):
      overrides.append(name[len("--config.") :])
  if not path or not os.path.isfile(path.split(":")[0]):
    return None
  spec = importlib.util.spec_from_file_location("_ssr_config", path.split(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  known = list(_leaves(module.get_config()))
  for field in overrides:
    if field not in known:
      near = difflib.get_close_matches(field, known, n=3, cutoff=0.5)
      hint = f"; nearest: {', '.join(near)}" if near else ""
      return f"--config.{field}: {path} has no field {field!r}{hint}"
  return None


def _parse_flags(argv):
  """absl's parser, with a one-line answer to a misspelled --config.FIELD override."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # ml_collections raises KeyError/AttributeError from deep inside.
    message = override_error(argv[1:]) or str(e).strip().splitlines()[-1]
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def initialize_distributed(train_cfg) -> None:
  """jax.distributed.initialize from config; empty / 0 fields are auto-detected (TPU pods,
  SLURM, Open MPI). Must run before anything touches a device."""
  import jax

  auto = train_cfg.num_processes <= 0
  jax.distributed.initialize(
    coordinator_address=train_cfg.coordinator_address or None,
    num_processes=None if auto else train_cfg.num_processes,
    process_id=None if auto else train_cfg.process_id,
  )


def bound_exit(grace_s: float) -> None:
  """Last resort against a hang on the way out: grace_s seconds from now, faulthandler prints
  every thread's stack to stderr and ends the process with status 1. Its timer is a C thread that
  needs no GIL, so it fires even inside interpreter shutdown (where tf.data iterators once hung)."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  faulthandler.dump_traceback_later(grace_s, exit=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config.train.distributed:
    initialize_distributed(config.train)
  # Late: --help stays fast, and jax sees no device before the distributed set-up above.
  from ssr_jax import config_check, experiment
  from ssr_jax.eval import run as eval_run

  # Library INFO logs (Orbax, absl) drown the progress lines: keep them at WARNING and let
  # ssr_jax's own loggers (training progress, data, demo) through at INFO.
  logging.set_verbosity(logging.WARNING)
  pylogging.getLogger("ssr_jax").setLevel(pylogging.INFO)
  # Orbax warns each time evaluation opens the checkpoints read-only, which is what it asks for.
  eval_run.quiet_read_only_notices()
  try:
    experiment.run(_MODE.value, config, _WORKDIR.value)
  except config_check.ConfigError as e:  # Usage errors, like a misspelled override: status 2.
    print("\n".join(f"error: {p}" for p in e.problems), file=sys.stderr)
    raise SystemExit(2) from None
  except experiment.UserError as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  else:
    if config.train.distributed:
      import jax

      # Its barrier waits for the slowest host (under jax's own timeout), so it comes before the
      # backstop; after an error it is left to the exit handlers, under the backstop, since the
      # other hosts may never reach it.
      jax.distributed.shutdown()
  finally:
    bound_exit(EXIT_GRACE_S)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
