"""The build command (the builders live in the package, see its docstring):

python -m ssr_jax.data.tfds_build --config configs/voc.py --config.data.root=... \\
    --config.data.tfds_data_dir=DIR [--splits train_aug,val,train] [--superpixels auto|yes|no] \\
    [--workers N] [--shard_size N]
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from ssr_jax.data import tfds_build
from ssr_jax.data.files import DataError

config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/voc.py).")
flags.DEFINE_string("splits", "", "Comma-separated splits (default: those the config reads).")
flags.DEFINE_string("superpixels", "auto", "auto (when SGC reads them), yes or no.")
flags.DEFINE_integer("workers", 0, "Processes (0 = one per usable core).")
flags.DEFINE_integer("shard_size", tfds_build.SHARD_SIZE, "Records per shard.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cfg = flags.FLAGS.config
  f = flags.FLAGS
  splits = f.splits.split(",") if f.splits else tfds_build.default_splits(cfg)
  if f.superpixels not in ("auto", "yes", "no"):
    raise SystemExit("--superpixels takes auto, yes or no")
  auto = f.superpixels == "auto"
  with_sp = tfds_build.needs_superpixels(cfg) if auto else f.superpixels == "yes"
  try:
    path = tfds_build.build(
      cfg.data, splits, superpixels=with_sp, workers=f.workers, shard_size=f.shard_size
    )
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"TFDS build ready: {path} (splits {', '.join(splits)})")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
