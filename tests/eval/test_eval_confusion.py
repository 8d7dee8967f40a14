"""The class x class confusion matrix of an evaluation: counts and row shares in metrics.json
(against per-pixel loops), the heatmap's colours, and its TensorBoard image."""

import io
import struct

import numpy as np
from PIL import Image

from ssr_jax import experiment
from ssr_jax.eval import metrics, visualize


def _oracle(pred, gt, c, ignore=255):
  """(counts, shares) by explicit loops over classes; shares None in absent ground-truth rows."""
  keep = gt != ignore
  counts = [[int(np.sum((gt == g) & (pred == p) & keep)) for p in range(c)] for g in range(c)]
  shares = [[x / sum(row) if sum(row) else None for x in row] for row in counts]
  return counts, shares


def test_scores_carry_the_confusion_matrix_of_a_numpy_oracle():
  rng = np.random.default_rng(0)
  c = 5
  gt = rng.choice([0, 1, 2, 4, 255], size=(3, 17, 13), p=[0.4, 0.2, 0.2, 0.1, 0.1])  # 3 absent.
  pred = rng.integers(0, c, size=gt.shape)
  names = ["background", "boat", "horse", "rider", "car"]
  s = metrics.scores(metrics.confusion_matrix(pred, gt, num_classes=c), names)
  counts, shares = _oracle(pred, gt, c)
  cm = s["confusion_matrix"]
  assert cm["classes"] == names and cm["counts"] == counts
  assert cm["shares"][3] == [None] * c
  for got, want in zip(cm["shares"], shares):
    if want[0] is not None:
      np.testing.assert_allclose(got, want, rtol=1e-12)
      assert abs(sum(got) - 1) < 1e-12  # Rows, not columns, are normalised.


def _count_colour(image, colour):
  return int(np.all(image == np.asarray(colour, np.uint8), axis=-1).sum())


def test_heatmap_colours_each_cell_by_its_row_share():
  counts = np.array([[50, 30, 20], [0, 0, 0], [10, 60, 30]])
  shares = metrics.row_shares(counts)
  image = visualize.confusion_heatmap(shares, ["background", "rider", "horse"])
  assert image.dtype == np.uint8 and image.ndim == 3
  for i in (0, 2):
    for j in range(3):  # Each cell's colour fills most of its cell (text aside).
      assert _count_colour(image, visualize.share_colour(shares[i, j])) > visualize.CELL**2 // 2
  assert _count_colour(image, (200, 200, 200)) > 3 * visualize.CELL**2 // 2  # Absent row.
  col = counts / counts.sum(0)  # Column-normalised colours (the wrong reading) are absent.
  assert _count_colour(image, visualize.share_colour(col[0, 1])) < visualize.CELL**2 // 4
  np.testing.assert_array_equal(visualize.share_colour([0.0, 1.0]), [[255, 255, 255], [8, 48, 107]])


def _tensorboard_images(folder) -> dict:
  """{(tag, step): uint8 image} of the image summaries in folder's event files."""
  from tensorboardX.proto import event_pb2

  out = {}
  for path in folder.glob("events.out.tfevents.*"):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        if v.HasField("image"):
          img = Image.open(io.BytesIO(v.image.encoded_image_string))
          out[(v.tag, event.step)] = np.asarray(img.convert("RGB"))
  return out


def test_eval_mode_logs_the_heatmap_and_scalars_to_tensorboard(tmp_path):
  heat = visualize.confusion_heatmap(metrics.row_shares(np.eye(3, dtype=int)), ["a", "b", "c"])
  res = dict(miou=0.5, precision=0.6, recall=0.7, confusion_ratio=None)
  res["images"] = {"val_seg/confusion_matrix": heat, "val_seg/val_00000": heat[:8]}
  experiment.log_evaluation(str(tmp_path), 7, {"val": {"seg": res}})
  images = _tensorboard_images(tmp_path / "eval" / "tensorboard")
  assert list(images) == [("eval/val_seg/confusion_matrix", 7)]  # The heatmap, not the grids.
  np.testing.assert_array_equal(images[("eval/val_seg/confusion_matrix", 7)], heat)
  line = (tmp_path / "eval" / "eval_metrics.jsonl").read_text()
  assert '"val/seg/miou": 0.5' in line and "confusion_ratio" not in line  # Undefined: left out.


def test_heatmap_rows_are_ground_truth_and_columns_predictions():
  shares = np.array([[0.1, 0.0, 0.9], [0.0, 1.0, 0.0], [0.3, 0.0, 0.7]])
  image = visualize.confusion_heatmap(shares, ["a", "b", "c"])

  def centre(share):
    ys, xs = np.nonzero(np.all(image == visualize.share_colour(share), axis=-1))
    return ys.mean(), xs.mean()

  (y09, x09), (y03, x03), (y10, x10) = centre(0.9), centre(0.3), centre(1.0)
  assert y09 < y10 < y03 and x03 < x10 < x09  # Cells (0, 2), (1, 1), (2, 0).
