"""The train step: one AdamW update of the trainable parameters, with a device-side NaN guard.

A *task* supplies the model, with Flax's `variables` convention ({"params": trainable, other
collections: mutable state such as BatchNorm statistics}):
  task.init(rng, batch) -> variables                    (jittable)
  task.loss(variables, frozen, batch, *, step, rng)
      -> (loss f32 scalar, (metrics dict of scalars, updated non-param collections))
`step` is the traced int32 step, so behaviour switches (e.g. the RFM switch step, CMPA's
prototype refresh) are jnp.where / lax.cond inside one compiled program. `frozen` (frozen CLIP
params, text embeddings) is passed through untouched and gets no gradient.
Optionally, `task.derived(variables) -> {name: array}`: values computed from the variables that
must stay finite for the state to be usable (e.g. CMPA's tau = exp(log_temperature), which
overflows to inf while log_temperature is still finite); the NaN guard checks them on every
updated state.
"""

import jax
import jax.numpy as jnp
import optax

from ssr_jax.train.sharding import batch_sharding, replicated
from ssr_jax.train.state import TrainState

NAN_POLICIES = ("halt", "skip")
# Metric names the step adds itself; a task metric with one of these names would be overwritten.
RESERVED_METRICS = ("loss", "grads", "lr", "grad_norm", "param_norm")
FINITE_PREFIX = "finite/"


def nonfinite_terms(measurements: dict) -> list[str]:
  """Names of the non-finite quantities in one step's measurements, fetched to the host.

  measurements: the metrics dict of one train step; its bool "finite/<name>" flags are read.
  """
  return sorted(
    k[len(FINITE_PREFIX) :]
    for k, v in measurements.items()
    if k.startswith(FINITE_PREFIX) and not v
  )


# An update trips the guard when its loss, its gradients or the state it makes (flags STATE_PREFIX
# + "params", "model_state", "opt_state" and each task-derived value) is non-finite; a task
# metric's flag only names it.
STATE_PREFIX = "state/"


def update_skipped(measurements: dict) -> bool:
  """Whether the guard tripped at this step (one step's host measurements)."""
  return not all(v for k, v in measurements.items() if _guarded(k))


def _guarded(key: str) -> bool:
  name = key[len(FINITE_PREFIX) :] if key.startswith(FINITE_PREFIX) else None
  return name is not None and (name in ("loss", "grads") or name.startswith(STATE_PREFIX))


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(task, tx: optax.GradientTransformation, *, schedule, nan_policy: str):
  """Returns `train_step(state, frozen, batch) -> (new_state, metrics)` (pure, jittable).

  schedule: the learning-rate schedule inside `tx` (from `make_optimizer`), used to log `lr`.
  nan_policy: "halt" applies every update (the host stops at its next check and never checkpoints
    a state that has seen a bad update); "skip" keeps params, model_state and opt_state
    unchanged at a step whose update is bad (like optax.apply_if_finite, a skipped step does not
    advance the optimizer's schedule).
  metrics: "loss", every task metric, "lr" (the rate this update used), "grad_norm" (global norm,
    before clipping), "param_norm" (before the update), and bool "finite/<name>" for the loss, each
    task metric, "grads", and the updated state's "state/params", "state/model_state",
    "state/opt_state" and "state/<name>" of each `task.derived` value. An update is bad when any
    of these but the task metrics' is false: the state's sticky `nonfinite_step` keeps the first
    such step and `nonfinite_count` counts them. A non-finite task metric alone does not trip the
    guard, but the host names it (from these flags) when the guard trips there.
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"train.nan_policy={nan_policy!r}: expected one of {NAN_POLICIES}.")
  skip = nan_policy == "skip"

  def train_step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      variables = {"params": params, **state.model_state}
      return task.loss(variables, frozen, batch, step=state.step, rng=rng)

    (loss, (terms, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    clash = sorted(
      set(terms) & set(RESERVED_METRICS)
      | {k for k in terms if k.startswith(("finite", STATE_PREFIX))}
    )
    if clash:
      raise ValueError(
        f"task.loss returned metrics {clash}: {RESERVED_METRICS}, 'finite*' and "
        f"'{STATE_PREFIX}*' are names the train step adds itself; rename them in the task."
      )
    finite = {"loss": jnp.isfinite(loss), "grads": _all_finite(grads)}
    finite.update({k: jnp.all(jnp.isfinite(v)) for k, v in terms.items()})

    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    # The state this update makes is what gets checkpointed: check it, not only its inputs.
    finite[STATE_PREFIX + "params"] = _all_finite(params)
    finite[STATE_PREFIX + "model_state"] = _all_finite(model_state)
    finite[STATE_PREFIX + "opt_state"] = _all_finite(opt_state)
    if hasattr(task, "derived"):
      derived = task.derived({"params": params, **model_state})
      finite.update({STATE_PREFIX + k: _all_finite(v) for k, v in derived.items()})
    ok = jnp.all(jnp.stack([f for k, f in finite.items() if _guarded(FINITE_PREFIX + k)]))
    if skip:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
      params = keep(params, state.params)
      opt_state = keep(opt_state, state.opt_state)
      model_state = keep(model_state, state.model_state)
      # Skipped updates do not advance the optimizer's step count, hence its schedule.
      opt_count = state.step - state.nonfinite_count
    else:
      opt_count = state.step

    first_bad = (state.nonfinite_step < 0) & ~ok
    new_state = TrainState(
      step=state.step + 1,
      params=params,
      model_state=model_state,
      opt_state=opt_state,
      rng=state.rng,
      nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
      nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
    )
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
    metrics["loss"] = jnp.asarray(loss, jnp.float32)
    metrics["lr"] = jnp.asarray(schedule(opt_count), jnp.float32)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(state.params)
    metrics.update({FINITE_PREFIX + n: f for n, f in finite.items()})
    return new_state, metrics

  return train_step


class JittedTrainStep:
  """`make_train_step` under jax.jit with declared shardings and the state donated.

  Arguments as `make_train_step`, plus the `mesh`. Call as `state, metrics = step(state, frozen,
  batch)`: state and frozen replicated on `mesh`, batch sharded on its leading axis (see
  sharding.put_batch). The input state's buffers are donated (reused for the output), so the
  caller must drop every reference to it. `trace_count` counts how many times the step was traced
  (1 for a whole run when shapes and dtypes are stable).
  """

  def __init__(self, task, tx, *, schedule, nan_policy: str, mesh):
    self.trace_count = 0
    step_fn = make_train_step(task, tx, schedule=schedule, nan_policy=nan_policy)

    def counted(state, frozen, batch):
      self.trace_count += 1  # Runs at trace time only.
      return step_fn(state, frozen, batch)

    repl = replicated(mesh)
    self._jitted = jax.jit(
      counted,
      in_shardings=(repl, repl, batch_sharding(mesh)),
      out_shardings=(repl, repl),
      donate_argnums=0,
    )

  def __call__(self, state: TrainState, frozen, batch):
    return self._jitted(state, frozen, batch)

  def lower(self, state, frozen, batch):
    """`jax.jit(...).lower`, e.g. for cost analysis or HLO inspection."""
    return self._jitted.lower(state, frozen, batch)
