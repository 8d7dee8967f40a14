"""Mesh/batch placement, and one device vs eight simulated devices give the same training."""

import functools

import jax
import numpy as np
import pytest
from toy_train_task import ToyTask, toy_batch, toy_frozen

from configs.base import get_config
from ssr_jax.train.sharding import batch_sharding, make_mesh, put_batch, replicated
from ssr_jax.train.state import create_train_state, make_optimizer
from ssr_jax.train.step import JittedTrainStep


def test_put_batch_shards_leading_axis():
  mesh = make_mesh()
  assert mesh.axis_names == ("data",) and mesh.size == 8
  batch = toy_batch(3, batch_size=16)
  g = put_batch(batch, mesh)
  for k, x in batch.items():
    assert g[k].shape == x.shape and g[k].dtype == x.dtype
    assert g[k].sharding == batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(g[k]), x)
    # Each device holds 2 consecutive rows.
    shard_rows = sorted(s.index[0].start for s in g[k].addressable_shards)
    assert shard_rows == list(range(0, 16, 2))


def test_put_batch_errors_name_the_fix():
  mesh = make_mesh()
  with pytest.raises(ValueError, match="train.batch_size"):
    put_batch(toy_batch(0, batch_size=6), mesh)
  bad = toy_batch(0, batch_size=8)
  bad["index"] = bad["index"][:4]
  with pytest.raises(ValueError, match="disagree"):
    put_batch(bad, mesh)


def _run(mesh, steps):
  tc = get_config().train
  tc.unlock()
  tc.update(learning_rate=1e-2, num_steps=20, warmup_steps=2)
  tx, schedule = make_optimizer(tc)
  task = ToyTask(switch_step=2)
  create = functools.partial(create_train_state, task, tx)
  state = jax.jit(create, out_shardings=replicated(mesh))(
    jax.random.PRNGKey(0), put_batch(toy_batch(0, batch_size=8), mesh)
  )
  frozen = jax.device_put(toy_frozen(), replicated(mesh))
  step = JittedTrainStep(task, tx, schedule=schedule, nan_policy="halt", mesh=mesh)
  losses = []
  for s in range(steps):
    state, metrics = step(state, frozen, put_batch(toy_batch(s, batch_size=8), mesh))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state.params), np.array(losses), state


def test_one_device_matches_eight_devices():
  p1, l1, _ = _run(make_mesh(jax.devices()[:1]), 6)
  p8, l8, s8 = _run(make_mesh(), 6)
  assert len({d.id for d in s8.params["hidden"]["kernel"].devices()}) == 8
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The run actually trained (so the comparison is not vacuous).
  assert not np.allclose(l1[0], l1[-1])
