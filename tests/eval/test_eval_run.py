"""eval.run: compiled inference reused across evaluations; per-process slices and sums."""

import argparse
import json
import os

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from PIL import Image

from benchmarks.common import bench_config, random_setup
from configs import base
from ssr_jax.data import pipeline, superpixels, synthetic
from ssr_jax.eval import inference, png, run, visualize


def test_second_evaluation_compiles_nothing_and_predicts_the_same():
  config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
  config.eval.batch_size = 2
  config.eval.long_side = 64
  task, frozen, batch = random_setup(config, small=True)
  variables = task.init(jax.random.PRNGKey(0), batch)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(40, 56), (56, 40), (40, 56)]]

  def go():
    return dict(run.seg_predictions(task, frozen, variables, images, config.eval))

  first = go()
  compiled = inference._multiscale_jit._cache_size()
  second = go()
  # A new logits function per call used to recompile every size bucket at every evaluation.
  assert inference._multiscale_jit._cache_size() == compiled
  assert sorted(first) == sorted(second) == [0, 1, 2]
  for i in first:
    np.testing.assert_array_equal(first[i], second[i])
    assert first[i].shape == images[i].shape[:2]


def _synthetic(tmp_path, num_val=4):
  """(config, task, frozen, variables) of a tiny random model on a synthetic val split."""
  synthetic.write_dataset(str(tmp_path / "data"), num_train=2, num_val=num_val, size=64, seed=0)
  config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
  data = base.get_config().data
  data.update(
    name="synthetic",
    root=str(tmp_path / "data"),
    train_split="train",
    val_split="val",
    num_classes=7,
    crop_size=64,
    num_workers=1,
  )
  config.data = data
  config.model.class_names = synthetic.SPEC.class_names
  config.eval.long_side = 64
  superpixels.precompute(config.data, "val", workers=1, progress=False)
  task, frozen, batch = random_setup(config, small=True)
  variables = task.init(jax.random.PRNGKey(0), batch)
  return config, task, frozen, variables


def test_second_cam_evaluation_compiles_nothing(tmp_path):
  config, task, frozen, variables = _synthetic(tmp_path)

  def go():
    return run.evaluate(
      config,
      str(tmp_path / "w"),
      task=task,
      frozen=frozen,
      variables=variables,
      step=0,
      target="cam",
      split="val",
      write_outputs=False,
    )

  first = go()
  compiled = run._cam_outputs._cache_size()
  second = go()
  assert run._cam_outputs._cache_size() == compiled  # Was: a new jit per evaluation.
  assert first["miou"] == second["miou"] and first["num_images"] == 4


_MAKE_EVAL_DATASET = pipeline.make_eval_dataset


def _as_process(monkeypatch, index, count):
  """Pretends to be process `index` of `count`: the data pipeline slices the split for it, and
  the all-gather returns this process's counts `count` times (as if every slice scored the
  same), so the sums are checkable on one machine."""
  calls = []

  def sliced(data_cfg, split, *, process_index, process_count, **kw):
    calls.append((process_index, process_count))
    return _MAKE_EVAL_DATASET(
      data_cfg, split, process_index=process_index, process_count=process_count, **kw
    )

  monkeypatch.setattr(run, "process", lambda: (index, count))
  monkeypatch.setattr(pipeline, "make_eval_dataset", sliced)
  monkeypatch.setattr(
    multihost_utils,
    "process_allgather",
    lambda tree, tiled=False: jax.tree.map(lambda x: np.stack([np.asarray(x)] * count), tree),
  )
  return calls


def _check_table5_metrics(config, workdir, printed):
  """metrics_val_seg.json holds precision, recall and FP/TP of the written predictions against
  the masks (per-class loops here), and the printed table shows them."""
  with open(workdir / "eval" / "metrics_val_seg.json") as f:
    res = json.load(f)
  pred_dir = workdir / "eval" / "val_seg" / "pred"
  pairs = [
    (png.load_label_png(pred_dir / f"{ex['id']}.png"), ex["mask"])
    for ex in pipeline.make_eval_dataset(config.data, "val", superpixels=False)
  ]
  prec, rec, confusion = [], [], []
  for c in range(config.data.num_classes):
    tp = sum(np.sum((p == c) & (g == c)) for p, g in pairs)
    fp = sum(np.sum((p == c) & (g != c) & (g != 255)) for p, g in pairs)
    fn = sum(np.sum((p != c) & (g == c)) for p, g in pairs)
    prec += [tp / (tp + fp)] if tp + fp else []
    rec += [tp / (tp + fn)] if tp + fn else []
    confusion += [fp / tp] if tp else []
  assert res["precision"] == pytest.approx(np.mean(prec), abs=1e-9)
  assert res["recall"] == pytest.approx(np.mean(rec), abs=1e-9)
  if confusion:
    assert res["confusion_ratio"] == pytest.approx(np.mean(confusion), abs=1e-9)
    assert f"{res['confusion_ratio']:7.3f}" in printed
  else:  # No TP at all (the random model may hit nothing): undefined, not 0.
    assert res["confusion_ratio"] is None
  assert set(res["per_class_confusion"]) == set(res["per_class_iou"])
  c = config.data.num_classes
  counts = [
    [sum(int(np.sum((g == i) & (p == j))) for p, g in pairs) for j in range(c)] for i in range(c)
  ]
  assert res["confusion_matrix"]["counts"] == counts
  heat = np.asarray(Image.open(workdir / "eval" / "val_seg" / "confusion.png"))
  for row in counts:  # The heatmap beside the grids shows each row's shares.
    for x in row:
      if sum(row):
        assert np.all(heat == visualize.share_colour(x / sum(row)), axis=-1).sum() > 100
  assert "precision" in printed and "recall" in printed and "confusion ratio" in printed


def test_each_process_scores_its_slice_and_only_process_0_writes(tmp_path, monkeypatch, capsys):
  config, task, frozen, variables = _synthetic(tmp_path)
  config.eval.num_vis = 4
  kw = dict(task=task, frozen=frozen, variables=variables, step=0, target="seg", split="val")
  single = run.evaluate(config, str(tmp_path / "one"), **kw)
  assert single["num_images"] == 4 and len(single["images"]) == 4 + 1  # Grids + the heatmap.
  ids = [ex["id"] for ex in pipeline.make_eval_dataset(config.data, "val", superpixels=False)]
  _check_table5_metrics(config, tmp_path / "one", capsys.readouterr().out)

  calls = _as_process(monkeypatch, 1, 2)
  other = run.evaluate(config, str(tmp_path / "p1"), **kw)
  assert calls == [(1, 2)]
  assert other["num_images"] == 4  # Its 2 images, counted for both processes.
  assert other["images"] == {}
  assert not os.path.exists(tmp_path / "p1" / "eval" / "metrics_val_seg.json")
  preds = sorted(os.listdir(tmp_path / "p1" / "eval" / "val_seg" / "pred"))
  assert preds == sorted(f"{ids[i]}.png" for i in (1, 3))  # Every process writes its own.

  _as_process(monkeypatch, 0, 2)
  lead = run.evaluate(config, str(tmp_path / "p0"), **kw)
  assert lead["num_images"] == 4 and len(lead["images"]) == 2 + 1  # Its 2 images + heatmap.
  assert os.path.exists(tmp_path / "p0" / "eval" / "metrics_val_seg.json")
  assert len(os.listdir(tmp_path / "p0" / "eval" / "val_seg" / "vis")) == 2


def test_split_label_keeps_outputs_in_the_workdir():
  assert run.split_label("val") == "val" and run.split_label("train_aug") == "train_aug"
  assert run.split_label("/data/lists/myval.txt") == "myval"
  assert run.split_label("gs://bucket/lists/val.txt") == "val"
  assert run.split_label("lists/my list (v2).txt") == "my_list__v2_"
  assert run.split_label("../..") == "split" and run.split_label("..txt") == "split"
