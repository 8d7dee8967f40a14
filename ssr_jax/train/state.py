"""Train state, optimizer and learning-rate schedule (method.md §1.7).

`TrainState` holds everything that changes during training and is checkpointed: the step, the
trainable parameters, the task's mutable collections (BatchNorm statistics, CMPA's prototype
bank), the optimizer state, the base PRNG key and the non-finite guard. The frozen
CLIP parameters and text embeddings are *not* in it: they enter the train step as a separate,
replicated argument and are identified in checkpoints only by a fingerprint.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

SCHEDULES = ("poly", "cosine")


@struct.dataclass
class TrainState:
  """Everything a train step reads and writes; a pytree (checkpointed as a whole).

  step: int32 scalar, number of updates applied so far, which is also the index of the next batch
    (the data order is a pure function of (seed, step), so this is the data position).
  params: trainable parameters.
  model_state: the task's other variable collections, updated by the step but not by the
    optimizer (e.g. {"batch_stats": ..., "bank": ...}; {} for a task without).
  opt_state: optax state of `make_optimizer`'s transformation.
  rng: uint32[2] base key; step s draws from `fold_in(rng, s)`, so resuming is exact.
  nonfinite_step: int32, first step whose loss or gradients were non-finite; -1 if none. Sticky,
    so the host can check it rarely (log/eval/checkpoint time) and still find the first bad step;
    which terms were non-finite there, the host reads from that step's `finite/*` measurements.
  nonfinite_count: int32, number of steps with a non-finite loss or gradient so far (under
    nan_policy "skip", the number of skipped updates, which the schedule's count leaves out).
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_step: jax.Array
  nonfinite_count: jax.Array


def make_schedule(
  learning_rate: float,
  *,
  num_steps: int,
  warmup_steps: int,
  warmup_ratio: float,
  kind: str = "poly",
  power: float = 1.0,
):
  """Learning rate as a function of the update count `it` (0-based), jittable.

  WeCLIP's PolyWarmupAdamW (method.md §1.7): for it < warmup_steps,
  lr0 * (1 - (1 - it / warmup_steps) * (1 - warmup_ratio)), a linear ramp from lr0 * warmup_ratio;
  then lr0 * (1 - it / num_steps) ** power. The decay uses the global `it`, not `it - warmup`, as
  WeCLIP does (hence a small step down at the end of warm-up). "cosine" replaces the poly factor by
  0.5 * (1 + cos(pi * it / num_steps)). The rate is 0 from num_steps on.
  """
  if kind not in SCHEDULES:
    raise ValueError(f"train.schedule={kind!r}: expected one of {SCHEDULES}.")
  if num_steps <= 0:
    raise ValueError(f"train.num_steps={num_steps}: must be positive.")

  def schedule(count):
    it = jnp.asarray(count, jnp.float32)
    # (num_steps - it) / num_steps rather than 1 - it / num_steps: the subtraction is exact for
    # integer steps, so the rate stays accurate to float32 rounding right up to the last step.
    remaining = jnp.clip((num_steps - it) / num_steps, 0.0, 1.0)
    if kind == "poly":
      decay = remaining**power
    else:
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * (1.0 - remaining)))
    if warmup_steps > 0:
      # WeCLIP's 1 - (1 - it/W) * (1 - ratio), rearranged: the original cancels catastrophically
      # in float32 at it = 0 (1 - 0.999999).
      warm = warmup_ratio + (1.0 - warmup_ratio) * (it / warmup_steps)
      decay = jnp.where(it < warmup_steps, warm, decay)
    return learning_rate * decay

  return schedule


# Top-level parameter names in the heads' optimizer group (CMPA's ISA/TSA and temperature).
HEAD_PARAMS = ("isa", "tsa", "log_temperature")
NO_WEIGHT_DECAY = ("log_temperature",)


def param_groups(params) -> dict:
  """Each top-level parameter subtree's optimizer group: "heads" (HEAD_PARAMS) or "decoder"."""
  return {
    k: jax.tree.map(lambda _, k=k: "heads" if k in HEAD_PARAMS else "decoder", v)
    for k, v in params.items()
  }


def make_optimizer(train_cfg):
  """AdamW with the §1.7 schedule and an optional global-norm clip. Returns (tx, schedule).

  train_cfg: the `c.train` section of the config (learning_rate, num_steps, warmup_steps,
  warmup_ratio, schedule, poly_power, b1, b2, eps, weight_decay, grad_clip, heads). Two parameter
  groups (`param_groups`): the decoder (and anything not a CMPA head) at train.learning_rate /
  weight_decay, CMPA's heads at train.heads.learning_rate / weight_decay, both with the same
  warm-up and decay shape. Weight decay is decoupled (torch.optim.AdamW semantics, as WeCLIP) and
  applies to every trainable parameter except the log-temperature. `schedule` is the decoder's.
  """

  def schedule_for(lr):
    return make_schedule(
      lr,
      num_steps=train_cfg.num_steps,
      warmup_steps=train_cfg.warmup_steps,
      warmup_ratio=train_cfg.warmup_ratio,
      kind=train_cfg.schedule,
      power=train_cfg.poly_power,
    )

  def adamw(lr, wd):
    return optax.adamw(
      schedule_for(lr),
      b1=train_cfg.b1,
      b2=train_cfg.b2,
      eps=train_cfg.eps,
      weight_decay=wd,
      mask=lambda p: {
        k: jax.tree.map(lambda _, k=k: k not in NO_WEIGHT_DECAY, v) for k, v in p.items()
      },
    )

  schedule = schedule_for(train_cfg.learning_rate)
  tx = optax.multi_transform(
    {
      "decoder": adamw(train_cfg.learning_rate, train_cfg.weight_decay),
      "heads": adamw(train_cfg.heads.learning_rate, train_cfg.heads.weight_decay),
    },
    param_groups,
  )
  if train_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), tx)
  return tx, schedule


def create_train_state(task, tx, rng: jax.Array, batch) -> TrainState:
  """Fresh state at step 0; jittable (call under `jax.jit(..., out_shardings=...)`).

  rng: uint32[2] key from `jax.random.PRNGKey(seed)`; split into the init key and the base key of
  the per-step keys. batch: a global batch (only its shapes matter to a well-behaved `task.init`).
  """
  init_rng, step_rng = jax.random.split(rng)
  variables = dict(task.init(init_rng, batch))
  params = variables.pop("params")
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=variables,
    opt_state=tx.init(params),
    rng=step_rng,
    nonfinite_step=jnp.full((), -1, jnp.int32),
    nonfinite_count=jnp.zeros((), jnp.int32),
  )
