"""eval.run.seg_predictions: repeated evaluations reuse their compiled inference."""

import argparse

import jax
import numpy as np

from ssr_jax.bench.model import bench_config, random_setup
from ssr_jax.eval import inference, run


def test_second_evaluation_compiles_nothing_and_predicts_the_same():
  config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
  with config.unlocked():
    config.eval.batch_size = 2
    config.eval.long_side = 64
  task, frozen, batch = random_setup(config, small=True)
  params = task.init(jax.random.PRNGKey(0), batch)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(40, 56), (56, 40), (40, 56)]]

  def go():
    return dict(run.seg_predictions(task, frozen, params, images, config.eval))

  first = go()
  compiled = inference._multiscale_jit._cache_size()
  second = go()
  # A new logits function per call used to recompile every size bucket at every evaluation.
  assert inference._multiscale_jit._cache_size() == compiled
  assert sorted(first) == sorted(second) == [0, 1, 2]
  for i in first:
    np.testing.assert_array_equal(first[i], second[i])
    assert first[i].shape == images[i].shape[:2]


def test_second_cam_evaluation_compiles_nothing(tmp_path):
  from configs import base
  from ssr_jax.data import superpixels, synthetic

  synthetic.write_dataset(str(tmp_path / "data"), num_train=2, num_val=4, size=64, seed=0)
  config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
  data = base.get_config().data
  with config.unlocked():
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
  superpixels.precompute(config.data, "val", workers=1, progress=False)
  task, frozen, batch = random_setup(config, small=True)
  params = task.init(jax.random.PRNGKey(0), batch)

  def go():
    return run.evaluate(
      config,
      str(tmp_path / "w"),
      task=task,
      frozen=frozen,
      params=params,
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
