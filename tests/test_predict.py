"""predict.py and evaluation batch no larger than the images at hand, one batch per input size."""

import argparse

import jax
import numpy as np

from benchmarks.common import bench_config, random_setup
from ssr_jax.eval import inference, run


def _padding(plan):
  return sum(-(-len(idx) // bs) * bs - len(idx) for bs, idx in plan)


def test_plan_batches_by_hand():
  # One 400x600 photo used to be padded with 15 dummies (eval.batch_size 16).
  one = inference.plan_batches([(400, 600)], limit=16, devices=1, long_side=512, multiple=16)
  assert one == [(1, [0])]
  # Input sizes with long_side=None, multiple 16: 32x48 (images 0, 1, 3), 48x32 (2), 64x64 (4;
  # 60x70 rounds to 64x64 as well).
  shapes = [(32, 48), (32, 48), (48, 32), (30, 50), (64, 64), (60, 70)]
  kw = dict(long_side=None, multiple=16)
  plan = inference.plan_batches(shapes, limit=16, devices=1, **kw)
  assert plan == [(3, [0, 1, 3]), (1, [2]), (2, [4, 5])]
  assert _padding(plan) == 0
  # Two devices: each size's batch rounds up to 2, so at most one dummy per size (1 + 1 + 0).
  plan = inference.plan_batches(shapes, limit=16, devices=2, **kw)
  assert plan == [(4, [0, 1, 3]), (2, [2]), (2, [4, 5])]
  assert _padding(plan) == 2
  # eval.batch_size still caps the batch: 3 images of one size in batches of 2 (one dummy).
  plan = inference.plan_batches(shapes[:4], limit=2, devices=1, **kw)
  assert plan == [(2, [0, 1, 3]), (1, [2])] and _padding(plan) == 1


def test_seg_predictions_runs_the_planned_batch_size(monkeypatch):
  config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
  config.eval.batch_size = 16
  config.eval.long_side = 64
  task, frozen, batch = random_setup(config, small=True)
  variables = task.init(jax.random.PRNGKey(0), batch)
  seen = []
  jitted = inference._multiscale_jit

  def spy(fn, x, **kw):
    seen.append(x.shape[0])
    return jitted(fn, x, **kw)

  monkeypatch.setattr(inference, "_multiscale_jit", spy)
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  (bs, idx), *rest = inference.plan_batches(
    [image.shape[:2]], limit=16, devices=jax.local_device_count(), long_side=64, multiple=16
  )
  out = dict(run.seg_predictions(task, frozen, variables, [image], config.eval, batch_size=bs))
  assert not rest and idx == [0] and out[0].shape == (40, 60)
  assert seen == [jax.local_device_count()]  # Not eval.batch_size (16).


def test_evaluation_batches_each_size_group_as_predict(tmp_path, monkeypatch):
  """Evaluation's seg predictions: one batch per input size, no larger than its images (rounded
  up to the devices), from the files' header sizes; the same predictions as one padded stream."""
  from ssr_jax.data import pipeline
  from tests.data.conftest import data_config, random_image, write_voc_tree

  config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
  config.eval.batch_size = 16
  config.eval.long_side = 64
  task, frozen, batch = random_setup(config, small=True)
  variables = task.init(jax.random.PRNGKey(0), batch)
  rng = np.random.default_rng(1)
  shapes = [(40, 60), (60, 40), (40, 60), (48, 48)]
  masks = [np.zeros(s, np.uint8) for s in shapes]
  lst = write_voc_tree(tmp_path, [random_image(rng, *s) for s in shapes], masks)
  data = data_config(name="voc", root=str(tmp_path), num_workers=2)
  dataset = pipeline.make_eval_dataset(data, lst, superpixels=False)
  assert dataset.image_sizes() == shapes

  seen = []
  jitted = inference._multiscale_jit

  def spy(fn, x, **kw):
    seen.append(x.shape[0])
    return jitted(fn, x, **kw)

  monkeypatch.setattr(inference, "_multiscale_jit", spy)
  got = {ex["id"]: p for ex, p in run.predict_seg(task, frozen, variables, dataset, config.eval)}
  devices = jax.local_device_count()
  assert sorted(seen) == [devices] * 3  # Three sizes, each batch no larger than the devices.
  seen.clear()
  images = [ex["image"] for ex in dataset]
  padded = dict(run.seg_predictions(task, frozen, variables, images, config.eval))
  assert seen == [16] * 3  # Before: every size padded to eval.batch_size.
  assert sorted(got) == [f"im{i}" for i in range(4)]
  for i in range(4):
    np.testing.assert_array_equal(got[f"im{i}"], padded[i])
