"""Image-level metrics (eval/image_level.py) and evaluation of a folder dataset without masks."""

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import bench_config, random_setup
from configs import base
from ssr_jax.clip import preprocess
from ssr_jax.data import make_folder, synthetic
from ssr_jax.eval import image_level, run


def _brute_ap(scores, targets):
  """AP as the textbook sum over ranks: precision@k at each relevant rank k / #relevant."""
  order = np.argsort(-scores, kind="stable")
  rel = targets[order] > 0
  prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
  return float((prec * rel).sum() / rel.sum())


def test_average_precision_against_the_rank_sum():
  rng = np.random.default_rng(0)
  for n in (1, 5, 30):
    scores = rng.permutation(n).astype(np.float64)  # Distinct: no ties.
    targets = rng.integers(0, 2, n)
    targets[0] = 1
    assert image_level.average_precision(scores, targets) == pytest.approx(
      _brute_ap(scores, targets)
    )
  # By hand: ranks 1 and 3 relevant -> (1/1 + 2/3) / 2.
  assert image_level.average_precision(np.array([3.0, 2, 1]), np.array([1, 0, 1])) == (
    pytest.approx((1 + 2 / 3) / 2)
  )
  # Ties count against: one positive tied with a negative at the top -> 1/2.
  assert image_level.average_precision(np.array([1.0, 1.0]), np.array([1, 0])) == 0.5
  assert image_level.average_precision(np.array([1.0]), np.array([0])) is None


def test_mean_ap_and_pixel_shares():
  scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.3]])
  labels = np.array([[1, 0], [0, 0], [1, 0]], np.float32)
  res = image_level.mean_average_precision(scores, labels, ["a", "b"])
  assert res == {"map": 1.0, "per_class_ap": {"a": 1.0, "b": None}}
  pred = np.array([[0, 1, 1], [2, 2, 2]])
  np.testing.assert_allclose(image_level.pixel_shares(pred, 4), [2 / 6, 3 / 6, 0.0])


@pytest.fixture(scope="module")
def folder_setup(tmp_path_factory):
  """(config, task, frozen, variables) of a tiny random model on a folder with no masks."""
  tmp = tmp_path_factory.mktemp("imagelevel")
  synthetic.write_dataset(str(tmp / "syn"), num_train=40, num_val=5, size=64, seed=0)
  make_folder.convert("synthetic", str(tmp / "syn"), str(tmp / "f"), ["train", "val"], masks="none")
  config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
  data = base.get_config().data
  data.update(name="folder", root=str(tmp / "f"), train_split="train", val_split="val")
  data.update(num_classes=7, crop_size=64, num_workers=1)
  config.data = data
  config.model.class_names = synthetic.SPEC.class_names
  config.model.cam.box_threshold = 0.4
  config.model.sgc.enabled = False
  config.eval.long_side = 64
  config.eval.num_vis = 2
  task, frozen, batch = random_setup(config, small=True)
  variables = task.init(jax.random.PRNGKey(0), batch)
  return config, task, frozen, variables, tmp


def test_zero_shot_scores_equal_a_direct_computation(folder_setup):
  config, task, frozen, _, _ = folder_setup
  image = np.random.default_rng(1).integers(0, 256, (32, 48, 3), np.uint8)
  got = image_level.zero_shot_scores(task, frozen, image)
  x = preprocess.normalize(jnp.asarray(image)[None], task.options.normalization)
  e = np.asarray(
    task.clip.apply({"params": frozen["clip"]}, x, method=type(task.clip).encode_image)
  )
  e = e[0] / np.linalg.norm(e[0])
  np.testing.assert_allclose(got, np.asarray(frozen["text_fg"]) @ e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["seg", "cam"])
def test_evaluation_without_masks_reports_image_level_metrics(folder_setup, target):
  config, task, frozen, variables, tmp = folder_setup
  work = tmp / f"w_{target}"
  res = run.evaluate(
    config,
    str(work),
    task=task,
    frozen=frozen,
    variables=variables,
    step=0,
    target=target,
    split="val",
  )
  assert res["miou"] is None and res["masked_images"] == 0 and res["num_images"] == 5
  labels = synthetic.read_split(str(tmp / "syn"), "val")["labels"]
  zs = res["zero_shot"]
  assert zs["map"] is not None and 0 < zs["map"] <= 1
  # The per-class APs: those of classes labelling a val image, None for the others.
  present = labels.sum(0) > 0
  assert [v is not None for v in zs["per_class_ap"].values()] == present.tolist()
  assert ("seg_classification" in res) == (target == "seg")
  written = json.loads((work / "eval" / f"metrics_val_{target}.json").read_text())
  assert written["zero_shot"]["map"] == pytest.approx(zs["map"])
  assert len(list((work / "eval" / f"val_{target}" / "vis").iterdir())) == 2  # The grids.
  assert len(list(itertools.islice((work / "eval" / f"val_{target}" / "pred").iterdir(), 9))) == 5
