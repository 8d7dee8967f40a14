"""The jitted train step: one trace, metrics against direct computation, NaN guard policies."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_train_task import TemperatureTask, ToyTask, toy_batch, toy_frozen

from configs.base import get_config
from ssr_jax.train.sharding import make_mesh, put_batch, replicated
from ssr_jax.train.state import create_train_state, make_optimizer
from ssr_jax.train.step import JittedTrainStep, make_train_step, nonfinite_terms


def _setup(task, nan_policy="halt"):
  tc = get_config().train
  tc.unlock()
  tc.update(learning_rate=1e-2, num_steps=20, warmup_steps=2)
  tx, schedule = make_optimizer(tc)
  mesh = make_mesh()
  state = jax.jit(functools.partial(create_train_state, task, tx), out_shardings=replicated(mesh))(
    jax.random.PRNGKey(0), put_batch(toy_batch(0, batch_size=8), mesh)
  )
  frozen = jax.device_put(toy_frozen(), replicated(mesh))
  step = JittedTrainStep(task, tx, schedule=schedule, nan_policy=nan_policy, mesh=mesh)
  return state, frozen, step, mesh, tx, schedule


def test_traced_once_across_switch_and_donates_state():
  task = ToyTask(switch_step=5)
  state, frozen, step, mesh, _, _ = _setup(task)
  aux = []
  for s in range(12):
    old = state
    state, metrics = step(state, frozen, put_batch(toy_batch(s, batch_size=8), mesh))
    aux.append(float(metrics["aux"]))
    assert old.params["hidden"]["kernel"].is_deleted()  # Donated.
  assert step.trace_count == 1
  assert int(state.step) == 12
  # The traced switch really switched: aux is 0 before step 5 and positive from it on.
  assert aux[:5] == [0.0] * 5 and min(aux[5:]) > 0


def test_metrics_match_direct_computation():
  task = ToyTask(switch_step=0)
  state, frozen, step, mesh, _, schedule = _setup(task)
  state, _ = step(state, frozen, put_batch(toy_batch(0, batch_size=8), mesh))  # Now at step 1.
  batch = put_batch(toy_batch(1, batch_size=8), mesh)
  params, rng = jax.device_get((state.params, state.rng))

  @jax.jit
  def direct(params, step_rng):
    return jax.value_and_grad(
      lambda p: task.loss({"params": p}, frozen, batch, step=jnp.int32(1), rng=step_rng),
      has_aux=True,
    )(params)

  (loss, (terms, _)), grads = direct(params, jax.random.fold_in(rng, 1))
  (other, _), _ = direct(params, jax.random.fold_in(rng, 2))
  new_state, m = step(state, frozen, batch)
  np.testing.assert_allclose(m["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(m["mse"], terms["mse"], rtol=1e-6)
  np.testing.assert_allclose(m["aux"], terms["aux"], rtol=1e-6)
  gn = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
  pn = np.sqrt(sum(np.sum(np.asarray(p, np.float64) ** 2) for p in jax.tree.leaves(params)))
  np.testing.assert_allclose(m["grad_norm"], gn, rtol=1e-5)
  np.testing.assert_allclose(m["param_norm"], pn, rtol=1e-5)
  np.testing.assert_allclose(m["lr"], schedule(1), rtol=1e-7)
  assert all(bool(m[k]) for k in ("finite/loss", "finite/grads", "finite/mse", "finite/aux"))
  assert int(new_state.step) == 2 and int(new_state.nonfinite_step) == -1
  # The dropout key is folded with the step: another step's key gives another loss.
  assert float(other) != float(loss)


def test_halt_policy_keeps_first_bad_step_sticky():
  task = ToyTask(switch_step=0, nan_step=3)
  state, frozen, step, mesh, _, _ = _setup(task, "halt")
  for s in range(6):
    state, metrics = step(state, frozen, put_batch(toy_batch(s, batch_size=8), mesh))
    if s == 3:
      bad_metrics = metrics
  assert int(state.nonfinite_step) == 3
  # The host names the bad terms from that step's finiteness flags; later steps add "mse".
  # The state that update made is flagged too (NaN params and Adam moments).
  bad = ["aux", "grads", "loss", "state/opt_state", "state/params"]
  assert nonfinite_terms(jax.device_get(bad_metrics)) == bad
  assert nonfinite_terms(jax.device_get(metrics)) == sorted(bad + ["mse"])
  # The update was applied (params NaN from then on, so every later step is non-finite too).
  assert int(state.nonfinite_count) == 3
  assert np.isnan(np.asarray(state.params["out"]["kernel"])).any()


def test_skip_policy_leaves_params_and_optimizer_unchanged():
  task = ToyTask(switch_step=0, nan_step=3)
  state, frozen, step, mesh, _, schedule = _setup(task, "skip")
  for s in range(3):
    state, _ = step(state, frozen, put_batch(toy_batch(s, batch_size=8), mesh))
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step(state, frozen, put_batch(toy_batch(3, batch_size=8), mesh))
  assert not bool(metrics["finite/loss"]) and not bool(metrics["finite/grads"])
  after = jax.device_get((state.params, state.opt_state))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 4 and int(state.nonfinite_step) == 3 and int(state.nonfinite_count) == 1
  state, metrics = step(state, frozen, put_batch(toy_batch(4, batch_size=8), mesh))
  assert bool(metrics["finite/loss"]) and np.isfinite(float(metrics["loss"]))
  # The skipped update did not advance the optimizer's count, so step 4 used schedule(3).
  np.testing.assert_allclose(metrics["lr"], schedule(3), rtol=1e-7)
  assert step.trace_count == 1


def test_reserved_metric_names_and_bad_policy_rejected():
  @dataclasses.dataclass(frozen=True)
  class Clashing(ToyTask):
    def loss(self, variables, frozen, batch, *, step, rng):
      loss, (m, coll) = super().loss(variables, frozen, batch, step=step, rng=rng)
      return loss, ({**m, "lr": loss}, coll)

  state, frozen, _, mesh, tx, schedule = _setup(ToyTask())
  fn = make_train_step(Clashing(), tx, schedule=schedule, nan_policy="halt")
  with pytest.raises(ValueError, match="'lr'"):
    jax.eval_shape(fn, state, frozen, put_batch(toy_batch(0, batch_size=8), mesh))
  with pytest.raises(ValueError, match="train.nan_policy"):
    make_train_step(ToyTask(), tx, schedule=schedule, nan_policy="ignore")


def test_guard_names_any_number_of_task_metrics():
  """No cap on the number of task metrics (the guard keeps no bitmask over them)."""

  @dataclasses.dataclass(frozen=True)
  class Many(ToyTask):
    def loss(self, variables, frozen, batch, *, step, rng):
      loss, (m, coll) = super().loss(variables, frozen, batch, step=step, rng=rng)
      extra = {f"t{i:02d}": loss * i for i in range(40)}
      return loss, ({**m, **extra}, coll)

  state, frozen, step, mesh, _, _ = _setup(Many(switch_step=0, nan_step=0))
  state, metrics = step(state, frozen, put_batch(toy_batch(0, batch_size=8), mesh))
  assert int(state.nonfinite_step) == 0
  want = ["aux", "grads", "loss"] + ["state/opt_state", "state/params"]
  want += [f"t{i:02d}" for i in range(40)]
  assert nonfinite_terms(jax.device_get(metrics)) == want


def test_guard_checks_the_updated_state_not_only_loss_and_gradients():
  """A model-state statistic overflowing to inf (1e10 ** 4 > float32's 3.4e38 at the update of
  step 3) trips the guard by itself: loss, gradients and params are all finite there."""
  state, frozen, step, mesh, _, _ = _setup(TemperatureTask(growth=1e10))
  for s in range(5):
    state, metrics = step(state, frozen, put_batch(toy_batch(s, batch_size=8), mesh))
    if s == 3:
      bad = jax.device_get(metrics)
  assert int(state.nonfinite_step) == 3
  assert nonfinite_terms(bad) == ["state/model_state"]
  assert np.isfinite(float(bad["loss"])) and float(state.model_state["stats"]["scale"]) == np.inf
