"""A toy task with the real task's interface, for the training-infrastructure tests.

Small MLP regression on a batch dict shaped like the real one, with a frozen projection (the
stand-in for frozen CLIP), dropout (uses the step rng), a term that switches on at a traced step
threshold (like the RFM switch) and an optional step at which the loss and gradients become NaN.
"""

import dataclasses
import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from configs.base import get_config
from ssr_jax.train.sharding import put_batch, replicated
from ssr_jax.train.state import create_train_state, make_optimizer

IMAGE_SIZE = 4
NUM_OUT = 3
FEATURES = 8


def toy_batch(step: int, *, batch_size: int, seed: int = 0) -> dict:
  """The batch of `step`: a pure function of (seed, step), like the real pipeline."""
  r = np.random.default_rng([seed, step])
  s = IMAGE_SIZE
  return {
    "image": r.integers(0, 256, (batch_size, s, s, 3), dtype=np.uint8),
    "labels": r.normal(size=(batch_size, NUM_OUT)).astype(np.float32),
    "superpixels": r.integers(0, 4, (batch_size, s, s)).astype(np.int32),
    "mask": r.random((batch_size, s, s)) > 0.2,
    "index": (step * batch_size + np.arange(batch_size)).astype(np.int32),
  }


def toy_frozen(seed: int = 0) -> dict:
  r = np.random.default_rng(seed + 1000)
  return {"proj": (r.normal(size=(IMAGE_SIZE * IMAGE_SIZE * 3, FEATURES)) / 7).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class ToyTask:
  hidden: int = 16
  switch_step: int = 5  # "aux" is 0 before this step (a traced switch, no recompilation).
  nan_step: int = -1  # At this step "aux", the loss and the gradients are NaN.
  dropout: float = 0.1

  def init(self, rng, batch):
    k1, k2 = jax.random.split(rng)
    params = {
      "hidden": {
        "kernel": jax.random.normal(k1, (FEATURES, self.hidden)) / np.sqrt(FEATURES),
        "bias": jnp.zeros((self.hidden,)),
      },
      "out": {
        "kernel": jax.random.normal(k2, (self.hidden, NUM_OUT)) / np.sqrt(self.hidden),
        "bias": jnp.zeros((NUM_OUT,)),
      },
    }
    return {"params": params}

  def loss(self, variables, frozen, batch, *, step, rng):
    params = variables["params"]
    x = batch["image"].astype(jnp.float32).reshape(batch["image"].shape[0], -1) / 255.0
    x = x @ frozen["proj"]
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    keep = jax.random.bernoulli(rng, 1.0 - self.dropout, h.shape)
    h = jnp.where(keep, h / (1.0 - self.dropout), 0.0)
    pred = h @ params["out"]["kernel"] + params["out"]["bias"]
    w = batch["mask"].astype(jnp.float32).mean(axis=(1, 2))[:, None]
    mse = jnp.mean(w * (pred - batch["labels"]) ** 2)
    aux = jnp.where(step >= self.switch_step, 0.1, 0.0) * jnp.mean(pred**2)
    aux = aux * jnp.where(step == self.nan_step, jnp.nan, 1.0)
    return mse + aux, ({"mse": mse, "aux": aux}, {})


@dataclasses.dataclass(frozen=True)
class TemperatureTask(ToyTask):
  """ToyTask with CMPA-like state: a learnable log-temperature whose tau = exp(.) the task
  declares as derived, pushed up by a linear loss term (`push`; tau overflows float32 from ~88.7
  on while the parameter and the loss stay finite), and a running statistic in model_state that
  grows `growth`-fold at every step."""

  push: float = 0.0
  growth: float = 1.0

  def init(self, rng, batch):
    variables = super().init(rng, batch)
    variables["params"]["log_temperature"] = jnp.zeros(())
    return {**variables, "stats": {"scale": jnp.ones(())}}

  def derived(self, variables):
    return {"tau": jnp.exp(variables["params"]["log_temperature"])}

  def loss(self, variables, frozen, batch, *, step, rng):
    loss, (metrics, _) = super().loss(variables, frozen, batch, step=step, rng=rng)
    loss = loss - self.push * variables["params"]["log_temperature"]
    return loss, (metrics, {"stats": {"scale": variables["stats"]["scale"] * self.growth}})


class ToyData:
  """`make_iterator(start_step)` for the toy batches; records what was asked for.

  starts: the start_step of every iterator made; consumed: the step of every batch yielded;
  closed: how many of the iterators were closed (or ended).
  sigterm_at: send SIGTERM to this process when yielding that step's batch.
  crash_at: raise RuntimeError instead of yielding that step's batch (a simulated crash).
  """

  def __init__(self, batch_size: int, *, seed: int = 0, sigterm_at=None, crash_at=None):
    self.batch_size, self.seed = batch_size, seed
    self.sigterm_at, self.crash_at = sigterm_at, crash_at
    self.starts, self.consumed, self.closed = [], [], 0

  def __call__(self, start_step: int):
    self.starts.append(start_step)

    def batches():
      step = start_step
      try:
        while True:
          if step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
          if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
          self.consumed.append(step)
          yield toy_batch(step, batch_size=self.batch_size, seed=self.seed)
          step += 1
      finally:
        self.closed += 1

    return batches()


def toy_state(mesh, *, task=None, train_cfg=None, seed: int = 0):
  """A fresh TrainState for the toy task, replicated on `mesh` (as train() creates it)."""
  tx, _ = make_optimizer(train_cfg if train_cfg is not None else get_config().train)
  create = functools.partial(create_train_state, task if task is not None else ToyTask(), tx)
  return jax.jit(create, out_shardings=replicated(mesh))(
    jax.random.PRNGKey(seed), put_batch(toy_batch(0, batch_size=8), mesh)
  )
