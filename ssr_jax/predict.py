"""Segment arbitrary images with a trained checkpoint.

  python -m ssr_jax.predict --workdir runs/voc --images photos/ img.jpg --out preds/

Writes <out>/<stem>.png (palette PNG, class ids preserved) and <out>/<stem>_overlay.png for each
image. The model config comes from the checkpoint itself. Unreadable images are reported by
name and skipped; the exit status is 1 if any failed.
"""

import argparse
import io
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from ssr_jax import experiment  # noqa: E402
from ssr_jax.data import files  # noqa: E402
from ssr_jax.eval import png, visualize  # noqa: E402
from ssr_jax.eval import run as eval_run  # noqa: E402
from ssr_jax.train.checkpoint import Checkpointer  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(paths):
  """Files named directly, plus the images inside named directories (sorted)."""
  out = []
  for p in paths:
    if epath.Path(p).is_dir():
      found = (f for f in epath.Path(p).iterdir() if f.name.lower().endswith(IMAGE_EXTS))
      out += sorted(str(f) for f in found)
    else:
      out.append(p)
  return out


def read_rgb(path):
  """uint8 [H, W, 3]; raises OSError/ValueError with the path for unreadable files."""
  try:
    with Image.open(io.BytesIO(files.read_bytes(path))) as im:
      im.load()
      return np.asarray(im.convert("RGB"))
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise OSError(f"{path}: cannot read image ({e})") from None


def load_config(workdir, step=None):
  """The ConfigDict stored with the checkpoint (latest, or `step`)."""
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    saved = ckpt.read_config(step=step)["config"]
  finally:
    ckpt.close()
  return ml_collections.ConfigDict(saved)


def segment(task, frozen, variables, images, eval_cfg):
  """(index, pred int32 [H, W]) of each uint8 image [H, W, 3], batched by
  `eval_run.plan_seg_batches` (as evaluation)."""
  plan = eval_run.plan_seg_batches(
    [im.shape[:2] for im in images], eval_cfg, multiple=task.clip.cfg.patch_size
  )
  for batch_size, idx in plan:
    group = [images[i] for i in idx]
    preds = eval_run.seg_predictions(
      task, frozen, variables, group, eval_cfg, batch_size=batch_size
    )
    for k, pred in preds:
      yield idx[k], pred


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="training workdir holding checkpoints/")
  ap.add_argument("--images", nargs="+", required=True, help="image files and/or directories")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--clip-weights", default=None, help="override the CLIP weights path")
  args = ap.parse_args(argv)

  eval_run.quiet_read_only_notices()
  paths = list_images(args.images)
  if not paths:
    print(f"error: no images found in {args.images}", file=sys.stderr)
    return 1
  try:
    config = load_config(args.workdir, args.step)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.clip_weights:
    config.clip.weights = args.clip_weights
  # The decoder alone predicts: no affinity, so no DINO to load (its path may not exist here).
  config.model.cam.dino_weight = 0.0
  task, frozen, _ = experiment.build(config)
  variables, step = eval_run.restore_variables(args.workdir, task, step=args.step)

  failed, images, names = [], [], []
  for p in paths:
    try:
      images.append(read_rgb(p))
      names.append(p)
    except OSError as e:
      print(f"skipped: {e}", file=sys.stderr)
      failed.append(p)
  out = epath.Path(args.out)  # Local or gs://.
  out.mkdir(parents=True, exist_ok=True)
  for i, pred in segment(task, frozen, variables, images, config.eval):
    stem = epath.Path(names[i]).stem
    png.save_label_png(out / f"{stem}.png", pred.astype(np.uint8))
    visualize.save_image(out / f"{stem}_overlay.png", png.overlay(images[i], pred))
  print(
    f"checkpoint step {step}: wrote {len(images)} predictions to {args.out}; {len(failed)} failed"
  )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
