"""eval.run.restore_variables reads the params and BatchNorm statistics only: another optimizer
setting, or another size of CMPA's (training-only) prototype bank, restores the same."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import bench_config, random_setup
from ssr_jax.eval import run
from ssr_jax.train import checkpoint, state


def _setup():
  config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
  config.eval.batch_size = 2
  config.eval.long_side = 64
  config.train.grad_clip = 0.0
  task, frozen, batch = random_setup(config, small=True)
  return config, task, frozen, batch


def _save_trained(workdir, config, task, batch):
  """A checkpoint at step 1 after one AdamW update (params and moments no longer initial)."""
  tx, _ = state.make_optimizer(config.train)
  s = state.create_train_state(task, tx, jax.random.PRNGKey(0), batch)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), s.params)
  updates, opt_state = tx.update(grads, s.opt_state, s.params)
  params = jax.tree.map(lambda p, u: p + 100.0 * u, s.params, updates)
  stats = jax.tree.map(lambda x: x + 0.25, s.model_state["batch_stats"])
  s = s.replace(
    step=jnp.int32(1),
    params=params,
    opt_state=opt_state,
    model_state={**s.model_state, "batch_stats": stats},
  )
  with checkpoint.Checkpointer(workdir, async_save=False) as ckpt:
    ckpt.save(1, s, config={"config": {}})
  return {"params": params, "batch_stats": stats}


def test_restore_ignores_the_optimizer_config_and_predicts_the_same(tmp_path):
  config, task, frozen, batch = _setup()
  saved = _save_trained(str(tmp_path), config, task, batch)
  # Evaluating under another optimizer setting: a TrainState target built from this config
  # (as eval used to) has a different opt_state tree and was refused as a mismatch.
  config.train.grad_clip = 1.0
  config.model.cmpa.bank_size = 8
  task, frozen, _ = random_setup(config, small=True)
  variables, step = run.restore_variables(str(tmp_path), task)
  assert step == 1 and set(variables) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, variables, saved)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(40, 56), (56, 40)]]
  want = dict(run.seg_predictions(task, frozen, saved, images, config.eval))
  got = dict(run.seg_predictions(task, frozen, variables, images, config.eval))
  for i in want:
    np.testing.assert_array_equal(got[i], want[i])


def test_restore_variables_names_a_differing_parameter(tmp_path):
  config, task, frozen, batch = _setup()
  _save_trained(str(tmp_path), config, task, batch)
  p = task.clip.cfg.patch_size
  fake = dict(image=jax.ShapeDtypeStruct((1, p, p, 3), jnp.uint8))
  target = jax.eval_shape(task.init, jax.random.PRNGKey(0), fake)
  target = {"params": target["params"]}
  target["params"]["decoder"]["head"]["bias"] = jax.ShapeDtypeStruct((99,), jnp.float32)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="decoder/head/bias"):
    checkpoint.restore_variables(str(tmp_path), target)
  with pytest.raises(FileNotFoundError, match="step 7"):
    checkpoint.restore_variables(str(tmp_path), target, step=7)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="no `nope`"):
    checkpoint.restore_variables(str(tmp_path), {"nope": {}})
