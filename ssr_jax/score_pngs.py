"""mIoU of PNG predictions against ground-truth PNGs, for any method's outputs.

  python -m ssr_jax.score_pngs --pred DIR --gt DIR --num-classes 21 [--ignore 255]
      [--class-names voc|coco|none] [--json OUT] [--workers 4]

Every ground-truth `*.png` in --gt is matched by file stem to `<stem>.png` in --pred. Both are
single-channel label PNGs (palette or grayscale) whose pixel values are class ids. The confusion
matrix is summed over all images, then per-class IoU = TP / (TP + FP + FN) and mIoU = their
mean over classes present in the ground truth or the predictions (`ssr_jax.eval.metrics`).
Prints the table and a JSON object (miou, per_class_iou, ...; fractions, not percent).
Exit status 1, with every offending file listed, if predictions are missing, sizes differ,
files cannot be read or hold out-of-range ids; 0 otherwise. Predictions without a ground truth
are ignored with a note on stderr.
"""

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from etils.epath import Path  # Local or gs:// folders.

from ssr_jax.data import coco, voc
from ssr_jax.eval.metrics import confusion_matrix, format_table, scores
from ssr_jax.eval.png import load_label_png

# Foreground names of --class-names (no dataset root to read them from here).
CLASSES = {"voc": voc.CLASSES, "coco": coco.CLASSES}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m ssr_jax.score_pngs", description=__doc__.split("\n")[0]
  )
  p.add_argument("--pred", required=True, type=Path, help="folder of predicted label PNGs")
  p.add_argument("--gt", required=True, type=Path, help="folder of ground-truth label PNGs")
  p.add_argument("--num-classes", required=True, type=int, help="e.g. 21 (VOC) or 81 (COCO)")
  p.add_argument(
    "--ignore", type=int, nargs="+", default=[255], help="ground-truth values to skip (255)"
  )
  p.add_argument("--class-names", choices=["voc", "coco", "none"], default="none")
  p.add_argument("--json", type=Path, default=None, help="also write the JSON result here")
  p.add_argument("--workers", type=int, default=4, help="threads reading PNGs")
  return p.parse_args(argv)


def _evaluate_one(pred_path: Path, gt_path: Path, num_classes: int, ignore):
  """(confusion matrix, None) or (None, error message) for one file pair."""
  try:
    gt = load_label_png(gt_path)
  except Exception as e:  # Any unreadable file is reported, not fatal.
    return None, f"unreadable ground truth {gt_path}: {e}"
  try:
    pred = load_label_png(pred_path)
  except Exception as e:
    return None, f"unreadable prediction {pred_path}: {e}"
  if pred.shape != gt.shape:
    return None, (
      f"size mismatch for {pred_path.stem}: prediction {pred.shape[1]}x{pred.shape[0]} "
      f"(WxH) vs ground truth {gt.shape[1]}x{gt.shape[0]} ({pred_path} vs {gt_path})"
    )
  try:
    return confusion_matrix(pred, gt, num_classes=num_classes, ignore=tuple(ignore)), None
  except ValueError as e:
    return None, f"{pred_path.stem} ({pred_path}, {gt_path}): {e}"


def evaluate_dirs(pred_dir: Path, gt_dir: Path, *, num_classes: int, ignore=(255,), workers=4):
  """(confusion matrix int64 [C, C], number of images, list of error lines)."""
  errors = []
  pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
  for name, d in (("--pred", pred_dir), ("--gt", gt_dir)):
    if not d.is_dir():
      errors.append(f"{name} folder {d} does not exist")
  if errors:
    return None, 0, errors
  gts = {p.stem: p for p in sorted(gt_dir.glob("*.png"))}
  preds = {p.stem: p for p in sorted(pred_dir.glob("*.png"))}
  if not gts:
    return None, 0, [f"no ground-truth *.png files in {gt_dir}"]
  missing = [s for s in gts if s not in preds]
  if missing:
    shown = ", ".join(missing[:20]) + (
      f", ... ({len(missing)} in all)" if len(missing) > 20 else ""
    )
    errors.append(f"{len(missing)} ground-truth files have no prediction in {pred_dir}: {shown}")
  extra = len([s for s in preds if s not in gts])
  if extra:
    print(f"note: {extra} predictions in {pred_dir} have no ground truth; ignored", file=sys.stderr)
  stems = [s for s in gts if s in preds]
  conf = np.zeros((num_classes, num_classes), np.int64)
  with ThreadPoolExecutor(max(1, workers)) as pool:
    results = pool.map(lambda s: _evaluate_one(preds[s], gts[s], num_classes, ignore), stems)
    for c, err in results:
      if err is not None:
        errors.append(err)
      else:
        conf += c
  return conf, len(stems), errors


def main(argv=None) -> int:
  args = parse_args(argv)
  names = None
  if args.class_names != "none":
    names = ("background", *CLASSES[args.class_names])
    if len(names) != args.num_classes:
      print(
        f"error: --class-names {args.class_names} has {len(names)} classes but --num-classes is "
        f"{args.num_classes}",
        file=sys.stderr,
      )
      return 1
  conf, n, errors = evaluate_dirs(
    args.pred, args.gt, num_classes=args.num_classes, ignore=args.ignore, workers=args.workers
  )
  if errors:
    print(f"error: {len(errors)} problem(s); no score computed:", file=sys.stderr)
    for e in errors:
      print(f"  {e}", file=sys.stderr)
    return 1
  s = scores(conf, names)
  result = {
    "miou": s["miou"],
    "per_class_iou": s["per_class_iou"],
    "pixel_accuracy": s["pixel_accuracy"],
    "mean_accuracy": s["mean_accuracy"],
    "precision": s["precision"],
    "recall": s["recall"],
    "confusion_ratio": s["confusion_ratio"],
    "num_images": n,
    "num_classes": args.num_classes,
    "ignore": list(args.ignore),
    "pred": str(args.pred),
    "gt": str(args.gt),
  }
  print(format_table(s))
  print(f"images: {n}")
  print(json.dumps(result))
  if args.json is not None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
