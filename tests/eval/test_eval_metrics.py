"""Confusion matrix and mIoU against explicit per-class loops (sets / boolean masks)."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssr_jax.eval.metrics import (
  ConfusionAccumulator,
  confusion_matrix,
  confusion_matrix_jax,
  format_table,
  precision_recall_confusion,
  scores,
)


def _oracle(preds, gts, num_classes, ignore=255):
  """Per-class TP/FP/FN counted with boolean masks over all images together."""
  tp, fp, fn = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
  for p, g in zip(preds, gts):
    valid = g != ignore
    for c in range(num_classes):
      tp[c] += np.sum((g == c) & (p == c) & valid)
      fp[c] += np.sum((g != c) & (p == c) & valid)
      fn[c] += np.sum((g == c) & (p != c) & valid)
  ious = {c: tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(num_classes) if tp[c] + fp[c] + fn[c]}
  return ious, sum(ious.values()) / len(ious)


def _random_maps(rng, n, num_classes, used):
  """Label maps over the classes in `used` (others absent), ~15% ignore pixels in gt."""
  preds, gts = [], []
  for _ in range(n):
    h, w = rng.integers(5, 30, size=2)
    g = rng.choice(used, size=(h, w)).astype(np.uint8)
    g[rng.random((h, w)) < 0.15] = 255
    p = np.where(rng.random((h, w)) < 0.6, np.where(g == 255, used[0], g), rng.choice(used, (h, w)))
    preds.append(p.astype(np.int32))
    gts.append(g)
  return preds, gts


def test_miou_matches_per_class_loops():
  rng = np.random.default_rng(0)
  num_classes = 9
  used = np.array([0, 1, 2, 4, 5, 7])  # 3, 6, 8 absent from both.
  preds, gts = _random_maps(rng, 6, num_classes, used)
  gts[0][0, 0], preds[0][0, 0] = 0, 6  # Class 6 only predicted: IoU 0, counted in the mean.
  acc = ConfusionAccumulator(num_classes)
  for p, g in zip(preds, gts):
    acc.add(p, g)
  s = acc.scores()
  ious, miou = _oracle(preds, gts, num_classes)
  assert s["miou"] == pytest.approx(miou, abs=1e-12)
  assert set(s["present"]) == {str(c) for c in ious}
  for c in range(num_classes):
    got = s["per_class_iou"][str(c)]
    assert (got is None) == (c not in ious)
    if c in ious:
      assert got == pytest.approx(ious[c], abs=1e-12)
  assert s["per_class_iou"]["6"] == 0.0 and s["per_class_iou"]["3"] is None
  valid = np.concatenate([(g != 255).ravel() for g in gts])
  correct = np.concatenate([(p == g).ravel() for p, g in zip(preds, gts)])
  assert s["pixel_accuracy"] == pytest.approx(correct[valid].mean())
  assert s["num_pixels"] == valid.sum()
  assert 0.0 <= s["miou"] <= 1.0


def test_merge_equals_single_accumulator_and_rows_are_gt():
  rng = np.random.default_rng(1)
  preds, gts = _random_maps(rng, 4, 5, np.arange(5))
  a, b, whole = ConfusionAccumulator(5), ConfusionAccumulator(5), ConfusionAccumulator(5)
  for i, (p, g) in enumerate(zip(preds, gts)):
    (a if i % 2 else b).add(p, g)
    whole.add(p, g)
  np.testing.assert_array_equal(a.merge(b).conf, whole.conf)
  conf = confusion_matrix(np.array([[1, 1]]), np.array([[0, 2]]), num_classes=3)
  assert conf[0, 1] == 1 and conf[2, 1] == 1 and conf.sum() == 2 and conf.dtype == np.int64


def test_bad_values_raise_with_clear_message():
  gt = np.zeros((2, 2), np.uint8)
  with pytest.raises(ValueError, match="prediction has values \\[21\\] outside 0..20"):
    confusion_matrix(np.full((2, 2), 21), gt, num_classes=21)
  gt[0, 0] = 254
  with pytest.raises(ValueError, match="ground truth has values \\[254\\]"):
    confusion_matrix(np.zeros((2, 2), np.int32), gt, num_classes=21)
  conf = confusion_matrix(np.zeros((2, 2), np.int32), gt, num_classes=21, ignore=(255, 254))
  assert conf.sum() == 3
  with pytest.raises(ValueError, match="shape"):
    confusion_matrix(np.zeros((2, 3), np.int32), gt, num_classes=21)


def test_confusion_matrix_jax_sharded_matches_numpy():
  rng = np.random.default_rng(2)
  b, h, w, c = 8, 12, 10, 6
  gt = rng.integers(0, c, (b, h, w)).astype(np.uint8)
  gt[rng.random((b, h, w)) < 0.2] = 255
  pred = rng.integers(0, c, (b, h, w)).astype(np.int32)
  valid = np.ones((b, h, w), bool)
  valid[-2:] = False  # Two dummy images.
  valid[0, :, 7:] = False  # Padded columns.
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
  args = [jax.device_put(a, sharding) for a in (pred, gt, valid)]
  got = np.asarray(confusion_matrix_jax(*args, num_classes=c, ignore=255))
  expect = confusion_matrix(np.where(valid, pred, 0), np.where(valid, gt, 255), num_classes=c)
  np.testing.assert_array_equal(got, expect)


def test_scores_hand_computed_and_table():
  # conf rows = gt: class 0 all right (4 px), class 1: 2 right, 1 predicted as 0; class 2 absent.
  conf = np.array([[4, 0, 0], [1, 2, 0], [0, 0, 0]])
  s = scores(conf, ["bg", "cat", "dog"])
  assert s["per_class_iou"] == {"bg": 0.8, "cat": pytest.approx(2 / 3), "dog": None}
  assert s["miou"] == pytest.approx((0.8 + 2 / 3) / 2)
  assert s["mean_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
  table = format_table(s)
  assert "mIoU" in table and "73.33" in table and "dog" in table


def test_precision_recall_confusion_hand_computed():
  # rows = gt, columns = prediction. Class 2 is only predicted (3 px, all wrong); class 3 is in
  # the ground truth (2 px) but never predicted.
  conf = np.array([[6, 1, 1, 0], [2, 4, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]])
  # TP = 6, 4, 0, 0; FP (column - TP) = 2, 1, 3, 0; FN (row - TP) = 2, 2, 0, 2.
  # precision: 6/8, 4/5, 0/3, undefined (no prediction)   -> mean of 3 = (0.75 + 0.8 + 0) / 3
  # recall:    6/8, 4/6, undefined (no gt), 0/2           -> mean of 3 = (0.75 + 2/3 + 0) / 3
  # FP / TP:   2/6, 1/4, undefined (TP 0), undefined      -> mean of 2 = (1/3 + 1/4) / 2
  r = precision_recall_confusion(conf)
  assert r["precision"] == pytest.approx((0.75 + 0.8) / 3)
  assert r["recall"] == pytest.approx((0.75 + 2 / 3) / 3)
  assert r["confusion_ratio"] == pytest.approx((1 / 3 + 1 / 4) / 2)
  np.testing.assert_allclose(r["per_class_precision"], [0.75, 0.8, 0.0, np.nan])
  np.testing.assert_allclose(r["per_class_recall"], [0.75, 2 / 3, np.nan, 0.0])
  np.testing.assert_allclose(r["per_class_confusion"], [1 / 3, 1 / 4, np.nan, np.nan])

  s = scores(conf, ["bg", "a", "b", "c"])
  assert s["precision"] == r["precision"] and s["recall"] == r["recall"]
  assert s["confusion_ratio"] == r["confusion_ratio"]
  assert s["recall"] == pytest.approx(s["mean_accuracy"])
  assert s["per_class_precision"] == {"bg": 0.75, "a": 0.8, "b": 0.0, "c": None}
  assert s["per_class_confusion"]["b"] is None and s["per_class_recall"]["b"] is None
  table = format_table(s)
  assert "precision" in table and "51.67" in table  # 100 * 1.55 / 3
  assert "recall" in table and "47.22" in table  # 100 * (0.75 + 2/3) / 3
  assert "confusion ratio" in table and "0.292" in table and "0.333" in table
  # Nothing right at all: every FP / TP is infinite, so the mean is undefined (None), not 0.
  wrong = scores(np.array([[0, 3], [2, 0]]))
  assert wrong["precision"] == 0.0 and wrong["recall"] == 0.0
  assert wrong["confusion_ratio"] is None and wrong["per_class_confusion"] == {"0": None, "1": None}
  assert format_table(wrong).splitlines()[-1].split() == ["confusion", "ratio", "-"]


def test_precision_recall_confusion_match_per_class_loops():
  rng = np.random.default_rng(2)
  preds, gts = _random_maps(rng, 5, 6, np.arange(6))
  acc = ConfusionAccumulator(6)
  for p, g in zip(preds, gts):
    acc.add(p, g)
  s = acc.scores()
  prec, rec, confusion = [], [], []
  for c in range(6):
    tp = fp = fn = 0
    for p, g in zip(preds, gts):
      valid = g != 255
      tp += np.sum((p == c) & (g == c) & valid)
      fp += np.sum((p == c) & (g != c) & valid)
      fn += np.sum((p != c) & (g == c) & valid)
    prec.append(tp / (tp + fp))
    rec.append(tp / (tp + fn))
    confusion.append(fp / tp)
  assert s["precision"] == pytest.approx(np.mean(prec), abs=1e-12)
  assert s["recall"] == pytest.approx(np.mean(rec), abs=1e-12)
  assert s["confusion_ratio"] == pytest.approx(np.mean(confusion), abs=1e-12)
