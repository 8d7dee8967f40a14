"""ssr_jax entry point: `python launch.py --config configs/voc.py --workdir runs/voc [--mode ...]`.

Flags only; the work is in ssr_jax.experiment. Config fields can be overridden on the command
line, e.g. `--config.train.num_steps=100 --config.clip.weights=/path/to/clip-vit-base-patch16`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_GCE_CHECK", "true")

import logging as pylogging  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ("train", "eval", "train_and_eval", "ablation")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported late so --help stays fast and jax sees the env.
  from ssr_jax import experiment
  from ssr_jax.eval import run as eval_run

  # Library INFO logs (Orbax, absl) drown the progress lines: keep them at WARNING and let
  # ssr_jax's own loggers (training progress, data, demo) through at INFO.
  logging.set_verbosity(logging.WARNING)
  pylogging.getLogger("ssr_jax").setLevel(pylogging.INFO)
  # Orbax warns each time evaluation opens the checkpoints read-only, which is what it asks for.
  eval_run.quiet_read_only_notices()
  try:
    experiment.run(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except experiment.UserError as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
