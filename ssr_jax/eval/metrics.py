"""Semantic-segmentation metrics: confusion matrix, mIoU and friends.

Convention (the standard one, as WeCLIP's `evaluate.scores`, environment.md "Standard mIoU"):
- The confusion matrix `conf[g, p]` counts pixels with ground truth g and prediction p, summed
  over the whole split (never averaged per image). Pixels whose ground truth is an ignore value
  (255 by default) are not counted.
- IoU_c = TP_c / (TP_c + FP_c + FN_c) = conf[c, c] / (row_c + col_c - conf[c, c]).
- mIoU is the mean of IoU_c over the classes that appear in the ground truth OR in the
  prediction (on counted pixels). A class absent from both has an undefined IoU (0/0) and is left
  out of the mean (it is reported as None). A class predicted but absent from the ground truth
  counts with IoU 0. mIoU is a fraction in [0, 1].
- Precision, recall and confusion ratio (SSR's Table 5; method §5): see `scores`.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _ignore_values(ignore) -> tuple[int, ...]:
  if ignore is None:
    return ()
  if isinstance(ignore, int | np.integer):
    return (int(ignore),)
  return tuple(int(v) for v in ignore)


def confusion_matrix(pred, gt, *, num_classes: int, ignore=255) -> np.ndarray:
  """int64 [C, C] confusion matrix of one label map (or a batch of them), rows = ground truth.

  pred, gt: integer arrays of the same shape (e.g. [H, W] or [B, H, W]).
  ignore: an int, a sequence of ints, or None; ground-truth pixels with these values are skipped.
  Raises ValueError if pred has a value outside 0..C-1 (anywhere), or if gt has a value that is
  neither in 0..C-1 nor an ignore value: both mean the files do not follow the label convention.
  """
  pred = np.asarray(pred)
  gt = np.asarray(gt)
  c = int(num_classes)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
  for name, a in (("prediction", pred), ("ground truth", gt)):
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
  pred = pred.astype(np.int64, copy=False).ravel()
  gt = gt.astype(np.int64, copy=False).ravel()
  bad = (pred < 0) | (pred >= c)
  if bad.any():
    vals = np.unique(pred[bad])[:10].tolist()
    raise ValueError(
      f"prediction has values {vals} outside 0..{c - 1} (num_classes={c}); predictions must be "
      "class ids, so map any 'uncertain' value to a class before evaluating"
    )
  ign = _ignore_values(ignore)
  counted = (gt >= 0) & (gt < c)
  skipped = np.isin(gt, ign) if ign else np.zeros_like(counted)
  bad = ~counted & ~skipped
  if bad.any():
    vals = np.unique(gt[bad])[:10].tolist()
    raise ValueError(
      f"ground truth has values {vals} that are neither class ids 0..{c - 1} nor ignore values "
      f"{list(ign)}; check num_classes, or add them to the ignore values"
    )
  idx = gt[counted] * c + pred[counted]
  return np.bincount(idx, minlength=c * c).reshape(c, c).astype(np.int64)


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore"))
def confusion_matrix_jax(pred, gt, valid=None, *, num_classes: int, ignore=255):
  """On-device int32 [C, C] confusion matrix (rows = ground truth) of a batch; jit-friendly.

  pred, gt: integer [B, H, W] (any matching shapes); valid: optional bool of the same shape
  (False for padding and dummy images); ignore: an int or a tuple of ints (static). Summing over
  a sharded batch needs no explicit psum: the result is a plain reduction that XLA all-reduces.
  Unlike `confusion_matrix` this cannot raise on bad values: pixels whose gt is an ignore value
  or outside 0..C-1, or whose pred is outside 0..C-1, are simply not counted. int32 counts are
  exact below 2**31 pixels per call; accumulate across batches on the host in int64.
  """
  c = int(num_classes)
  pred = jnp.asarray(pred).astype(jnp.int32)
  gt = jnp.asarray(gt).astype(jnp.int32)
  m = (gt >= 0) & (gt < c) & (pred >= 0) & (pred < c)
  for v in _ignore_values(ignore):
    m &= gt != v
  if valid is not None:
    m &= jnp.asarray(valid, bool)
  idx = jnp.where(m, gt * c + pred, 0).ravel()
  conf = jnp.zeros((c * c,), jnp.int32).at[idx].add(m.ravel().astype(jnp.int32))
  return conf.reshape(c, c)


class ConfusionAccumulator:
  """Sums confusion matrices over a split (int64 on the host)."""

  def __init__(self, num_classes: int, ignore=255):
    self.num_classes = int(num_classes)
    self.ignore = ignore
    self.conf = np.zeros((self.num_classes, self.num_classes), np.int64)

  def add(self, pred, gt) -> None:
    """Adds one label map pair (or batch); see `confusion_matrix` for the checks."""
    self.conf += confusion_matrix(pred, gt, num_classes=self.num_classes, ignore=self.ignore)

  def add_conf(self, conf) -> None:
    """Adds a [C, C] matrix computed elsewhere (e.g. by `confusion_matrix_jax`)."""
    conf = np.asarray(conf)
    if conf.shape != self.conf.shape:
      raise ValueError(f"confusion matrix shape {conf.shape} != {self.conf.shape}")
    self.conf += conf.astype(np.int64)

  def merge(self, other: "ConfusionAccumulator") -> "ConfusionAccumulator":
    """Adds another accumulator's counts into this one (returns self)."""
    if other.num_classes != self.num_classes:
      raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
    self.conf += other.conf
    return self

  def scores(self, class_names: Sequence[str] | None = None) -> dict:
    return scores(self.conf, class_names)


def _mean_defined(num, den):
  """Per-class num / den (NaN where den == 0) and its mean over the defined classes (None if
  there are none: e.g. no TP at all makes every confusion ratio infinite, not 0)."""
  ok = den > 0
  ratio = np.where(ok, num / np.maximum(den, 1), np.nan)
  return ratio, (float(ratio[ok].mean()) if ok.any() else None)


def precision_recall_confusion(conf) -> dict:
  """Per-class precision, recall and confusion ratio of a [C, C] confusion matrix (rows = gt).

  With TP_c = conf[c, c], FP_c = column sum - TP_c, FN_c = row sum - TP_c, per class c:
    precision_c = TP_c / (TP_c + FP_c), recall_c = TP_c / (TP_c + FN_c),
    confusion_c = FP_c / TP_c,
  each averaged over the classes where it is defined (denominator > 0; background included,
  as for mIoU), so a class never predicted has no precision and one with TP = 0 no confusion.
  Sources: per-class precision and recall, then the class mean, as the `eval_cam` scripts of
  the AdvCAM / W-OoD / CLIMS code lineage compute them (stored public code); the confusion ratio
  m = FP / TP is the one attributed to CLIMS (Xie et al., CVPR 2022), which introduced it for
  activation spilling onto co-occurring background; here FP counts all other classes' pixels.
  The CLIMS text itself was not in the material we could search, so that attribution is
  unverified; the paper's numbers do rule out the alternative (FP + FN) / TP: its class mean is
  >= 1 / mIoU - 1 (Jensen), 0.258 for SSR's mIoU .795, above the .198 reported, while FP / TP
  is consistent (class mean >= 1 / precision - 1 = 0.138 for SSR, 0.185 for WeCLIP's .237).
  Recall equals `mean_accuracy`.

  Returns dict(precision, recall, confusion_ratio: floats, None where no class defines them;
  per_class_precision,
  per_class_recall, per_class_confusion: [C] float64 arrays, NaN where undefined).
  """
  conf = np.asarray(conf, np.int64)
  tp = np.diag(conf).astype(np.float64)
  fp = conf.sum(axis=0) - tp
  fn = conf.sum(axis=1) - tp
  prec, mean_prec = _mean_defined(tp, tp + fp)
  rec, mean_rec = _mean_defined(tp, tp + fn)
  confusion, mean_confusion = _mean_defined(fp, tp)
  return dict(
    precision=mean_prec,
    recall=mean_rec,
    confusion_ratio=mean_confusion,
    per_class_precision=prec,
    per_class_recall=rec,
    per_class_confusion=confusion,
  )


def row_shares(conf) -> np.ndarray:
  """float64 [C, C]: conf[g, p] / (pixels of ground truth g), NaN rows for classes absent from
  the ground truth. Row g says where class g's pixels went: share[rider, horse] is the part of
  the riders predicted as horse (co-occurrence), share[boat, 0] the part lost to background."""
  conf = np.asarray(conf, np.int64)
  rows = conf.sum(axis=1, keepdims=True)
  return np.where(rows > 0, conf / np.maximum(rows, 1), np.nan)


def scores(conf, class_names: Sequence[str] | None = None) -> dict:
  """Metrics of a [C, C] confusion matrix (rows = ground truth, columns = prediction).

  Returns a JSON-ready dict:
    miou: mean IoU (fraction in [0, 1]) over classes present in ground truth OR prediction;
    per_class_iou: {name: IoU, or None for a class absent from both};
    pixel_accuracy: sum(TP) / counted pixels;
    mean_accuracy: mean over classes present in the ground truth of TP / (ground-truth pixels);
    present: names of the classes that enter the mean; num_pixels: counted pixels;
    precision, recall, confusion_ratio and per_class_{precision,recall,confusion} ({name: value,
    or None where undefined}): see `precision_recall_confusion`;
    confusion_matrix: {"classes": names, "counts": conf as lists (rows = ground truth),
    "shares": `row_shares` as lists, None in the rows of classes absent from the ground truth}.
  Class names default to "0", "1", ...
  """
  conf = np.asarray(conf, np.int64)
  c = conf.shape[0]
  if conf.shape != (c, c):
    raise ValueError(f"confusion matrix must be square, got {conf.shape}")
  names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
  if len(names) != c:
    raise ValueError(f"{len(names)} class names for a {c}-class confusion matrix")
  tp = np.diag(conf).astype(np.float64)
  gt_count = conf.sum(axis=1).astype(np.float64)
  pred_count = conf.sum(axis=0).astype(np.float64)
  union = gt_count + pred_count - tp
  present = union > 0
  iou = np.where(present, tp / np.maximum(union, 1), np.nan)
  in_gt = gt_count > 0
  total = conf.sum()
  prc = precision_recall_confusion(conf)

  def per_class(v):
    return {n: (None if np.isnan(x) else float(x)) for n, x in zip(names, v)}

  return {
    "miou": float(iou[present].mean()) if present.any() else 0.0,
    "per_class_iou": {n: (float(v) if p else None) for n, v, p in zip(names, iou, present)},
    "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
    "mean_accuracy": float((tp[in_gt] / gt_count[in_gt]).mean()) if in_gt.any() else 0.0,
    "present": [n for n, p in zip(names, present) if p],
    "num_pixels": int(total),
    "precision": prc["precision"],
    "recall": prc["recall"],
    "confusion_ratio": prc["confusion_ratio"],
    "per_class_precision": per_class(prc["per_class_precision"]),
    "per_class_recall": per_class(prc["per_class_recall"]),
    "per_class_confusion": per_class(prc["per_class_confusion"]),
    "confusion_matrix": {
      "classes": names,
      "counts": conf.tolist(),
      "shares": [[None if np.isnan(x) else float(x) for x in row] for row in row_shares(conf)],
    },
  }


def format_table(s: dict) -> str:
  """Fixed-width text table of a `scores` dict; undefined entries shown as '-'.

  IoU, precision and recall in percent; the confusion ratio FP / TP as a plain ratio (SSR's
  Table 5 style, e.g. 0.198). A dict without the precision keys prints the IoU column only.
  """
  width = max([len(n) for n in s["per_class_iou"]] + [15])
  cols = [("IoU (%)", "per_class_iou", 100.0, "7.2f")]
  if "per_class_precision" in s:
    cols += [
      ("prec (%)", "per_class_precision", 100.0, "8.2f"),
      ("rec (%)", "per_class_recall", 100.0, "7.2f"),
      ("FP/TP", "per_class_confusion", 1.0, "6.3f"),
    ]

  def cell(v, scale, fmt):
    w = int(fmt.split(".")[0])
    return f"{'-' if v is None else format(scale * v, fmt):>{w}}"

  header = f"{'class':<{width}}" + "".join(f"  {name}" for name, *_ in cols)
  rule = "-" * len(header)
  lines = [header, rule]
  for name in s["per_class_iou"]:
    lines.append(
      f"{name:<{width}}" + "".join(f"  {cell(s[k][name], sc, f)}" for _, k, sc, f in cols)
    )
  lines.append(rule)
  lines.append(f"{'mIoU':<{width}}  {100 * s['miou']:7.2f}")
  lines.append(f"{'pixel accuracy':<{width}}  {100 * s['pixel_accuracy']:7.2f}")
  lines.append(f"{'mean accuracy':<{width}}  {100 * s['mean_accuracy']:7.2f}")
  if "precision" in s:
    for label, key, scale, fmt in (
      ("precision", "precision", 100.0, "7.2f"),
      ("recall", "recall", 100.0, "7.2f"),
      ("confusion ratio", "confusion_ratio", 1.0, "7.3f"),
    ):
      lines.append(f"{label:<{width}}  {cell(s[key], scale, fmt)}")
  return "\n".join(lines)
