"""Segment arbitrary images with a trained checkpoint.

  python -m ssr_jax.predict --workdir runs/voc --images photos/ img.jpg --out preds/

Writes <out>/<stem>.png (palette PNG, class ids preserved) and <out>/<stem>_overlay.png for each
image. The model config comes from the checkpoint itself. Unreadable images are reported by
name and skipped; the exit status is 1 if any failed.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(paths):
  """Files named directly, plus the images inside named directories (sorted)."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
    else:
      out.append(p)
  return out


def read_rgb(path):
  """uint8 [H, W, 3]; raises OSError/ValueError with the path for unreadable files."""
  try:
    with Image.open(path) as im:
      im.load()
      return np.asarray(im.convert("RGB"))
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise OSError(f"{path}: cannot read image ({e})") from None


def load_config(workdir, step=None):
  """The ConfigDict stored with the checkpoint (latest, or `step`)."""
  from ssr_jax.train.checkpoint import Checkpointer

  ckpt = Checkpointer(workdir, read_only=True)
  try:
    saved = ckpt.read_config(step=step)["config"]
  finally:
    ckpt.close()
  return ml_collections.ConfigDict(saved)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="training workdir holding checkpoints/")
  ap.add_argument("--images", nargs="+", required=True, help="image files and/or directories")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--clip-weights", default=None, help="override the CLIP weights path")
  args = ap.parse_args(argv)

  from ssr_jax import experiment
  from ssr_jax.eval import loop, png

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
  if args.step is not None:
    config.eval.checkpoint_step = args.step
  task, frozen, _ = experiment.build(config, args.workdir)
  params, step = loop.restore_params(config, args.workdir, task)

  failed, images, names = [], [], []
  for p in paths:
    try:
      images.append(read_rgb(p))
      names.append(p)
    except OSError as e:
      print(f"skipped: {e}", file=sys.stderr)
      failed.append(p)
  os.makedirs(args.out, exist_ok=True)
  for i, pred in loop.seg_predictions(task, frozen, params, images, config.eval):
    stem = os.path.splitext(os.path.basename(names[i]))[0]
    png.save_label_png(os.path.join(args.out, f"{stem}.png"), pred.astype(np.uint8))
    Image.fromarray(png.overlay(images[i], pred)).save(
      os.path.join(args.out, f"{stem}_overlay.png")
    )
  print(
    f"checkpoint step {step}: wrote {len(images)} predictions to {args.out}; {len(failed)} failed"
  )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
