"""eval.loop.seg_predictions: repeated evaluations reuse their compiled inference."""

import argparse

import jax
import numpy as np

from ssr_jax.bench.model import bench_config, random_setup
from ssr_jax.eval import inference, loop


def test_second_evaluation_compiles_nothing_and_predicts_the_same():
  config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
  with config.unlocked():
    config.eval.batch_size = 2
    config.eval.long_side = 64
  task, frozen, batch = random_setup(config, small=True)
  params = task.init(jax.random.PRNGKey(0), batch)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(40, 56), (56, 40), (40, 56)]]

  def run():
    return dict(loop.seg_predictions(task, frozen, params, images, config.eval))

  first = run()
  compiled = inference._multiscale_jit._cache_size()
  second = run()
  # A new logits function per call used to recompile every size bucket at every evaluation.
  assert inference._multiscale_jit._cache_size() == compiled
  assert sorted(first) == sorted(second) == [0, 1, 2]
  for i in first:
    np.testing.assert_array_equal(first[i], second[i])
    assert first[i].shape == images[i].shape[:2]
