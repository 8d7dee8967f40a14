"""`python -m ssr_jax.score_pngs`: hand-computed mIoU and clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ssr_jax.eval.png import save_label_png
from ssr_jax.score_pngs import main

GT_A = np.array([[0, 1, 1], [255, 2, 0]], np.uint8)
PRED_A = np.array([[0, 1, 2], [1, 2, 0]], np.uint8)  # The 1 on the ignore pixel must not count.
GT_B = np.full((2, 2), 3, np.uint8)
PRED_B = np.array([[3, 0], [0, 0]], np.uint8)


def _write(tmp_path, pairs):
  for stem, (pred, gt) in pairs.items():
    if pred is not None:
      save_label_png(tmp_path / "pred" / f"{stem}.png", pred)
    save_label_png(tmp_path / "gt" / f"{stem}.png", gt, palette=None)
  return str(tmp_path / "pred"), str(tmp_path / "gt")


def test_hand_computed_miou(tmp_path, capsys):
  pred, gt = _write(tmp_path, {"a": (PRED_A, GT_A), "b": (PRED_B, GT_B)})
  out_json = tmp_path / "out" / "r.json"
  rc = main(["--pred", pred, "--gt", gt, "--num-classes", "5", "--json", str(out_json)])
  assert rc == 0
  # Split totals: class 0 TP 2 FP 3 -> 0.4; 1: TP 1 FN 1 -> 0.5; 2: TP 1 FP 1 -> 0.5;
  # 3: TP 1 FN 3 -> 0.25; 4 absent -> excluded. mIoU = 1.65 / 4 (per-image means would differ).
  r = json.loads(out_json.read_text())
  assert r["miou"] == pytest.approx(0.4125)
  assert r["per_class_iou"] == {"0": pytest.approx(0.4), "1": 0.5, "2": 0.5, "3": 0.25, "4": None}
  assert r["pixel_accuracy"] == pytest.approx(5 / 9) and r["num_images"] == 2
  # FP 3, 0, 1, 0 and FN 0, 1, 0, 3: precision (2/5 + 1 + 1/2 + 1) / 4, recall
  # (1 + 1/2 + 1 + 1/4) / 4, FP / TP (3/2 + 0 + 1 + 0) / 4.
  assert r["precision"] == pytest.approx(0.725) and r["recall"] == pytest.approx(0.6875)
  assert r["confusion_ratio"] == pytest.approx(0.625)
  stdout = capsys.readouterr().out
  assert "41.25" in stdout
  assert json.loads(stdout.strip().splitlines()[-1])["miou"] == pytest.approx(0.4125)


def test_missing_and_mismatched_files_are_named(tmp_path, capsys):
  pred, gt = _write(
    tmp_path,
    {"a": (PRED_A, GT_A), "gone1": (None, GT_B), "gone2": (None, GT_B), "b": (PRED_A, GT_B)},
  )
  (tmp_path / "gt" / "broken.png").write_bytes(b"not a png")
  save_label_png(tmp_path / "pred" / "broken.png", GT_B)
  assert main(["--pred", pred, "--gt", gt, "--num-classes", "5"]) == 1
  err = capsys.readouterr().err
  assert "2 ground-truth files have no prediction" in err and "gone1, gone2" in err
  assert "size mismatch for b" in err and "3x2" in err and "2x2" in err
  assert "unreadable ground truth" in err and "broken.png" in err


def test_out_of_range_and_class_name_errors(tmp_path, capsys):
  pred, gt = _write(tmp_path, {"a": (PRED_A, GT_A)})
  assert main(["--pred", pred, "--gt", gt, "--num-classes", "2"]) == 1
  assert "outside 0..1" in capsys.readouterr().err
  assert main(["--pred", pred, "--gt", gt, "--num-classes", "3", "--class-names", "voc"]) == 1
  assert "21 classes" in capsys.readouterr().err
  assert main(["--pred", pred + "_nope", "--gt", gt, "--num-classes", "3"]) == 1
  assert "does not exist" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
  pred, gt = _write(tmp_path, {"a": (np.where(GT_A == 255, 0, GT_A), GT_A)})
  res = subprocess.run(
    [sys.executable, "-m", "ssr_jax.score_pngs", "--pred", pred, "--gt", gt, "--num-classes", "3"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert res.returncode == 0, res.stderr
  assert json.loads(res.stdout.strip().splitlines()[-1])["miou"] == 1.0
