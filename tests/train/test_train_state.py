"""LR schedule vs WeCLIP's formula; optimizer vs torch.optim.AdamW driven like WeCLIP's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.base import get_config
from ssr_jax.train.state import make_optimizer, make_schedule


def weclip_lr(it, *, lr0, warmup, ratio, max_it, power):
  """PolyWarmupAdamW.step (method.md §1.7), written out by hand in float64."""
  if it < warmup:
    return lr0 * (1 - (1 - it / warmup) * (1 - ratio))
  if it < max_it:
    return lr0 * (1 - it / max_it) ** power
  return 0.0


def test_poly_schedule_matches_weclip_formula():
  kw = dict(lr0=2e-3, warmup=50, ratio=1e-6, max_it=30000, power=1.0)
  sched = make_schedule(2e-3, num_steps=30000, warmup_steps=50, warmup_ratio=1e-6, power=1.0)
  its = np.array([0, 1, 2, 25, 49, 50, 51, 1000, 15000, 29998, 29999, 30000, 30500])
  got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(its)))
  want = np.array([weclip_lr(int(i), **kw) for i in its])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
  # Hand-computed anchors: start of warm-up, end of warm-up, midpoint, last step.
  assert got[0] == pytest.approx(2e-3 * 1e-6, rel=1e-6)
  assert got[5] == pytest.approx(2e-3 * (1 - 50 / 30000), rel=1e-6)
  assert got[8] == pytest.approx(1e-3, rel=1e-6)
  assert got[10] == pytest.approx(2e-3 / 30000, rel=1e-5)


def test_poly_power_and_cosine():
  p = make_schedule(1.0, num_steps=100, warmup_steps=0, warmup_ratio=0.0, power=0.9)
  c = make_schedule(1.0, num_steps=100, warmup_steps=10, warmup_ratio=0.1, kind="cosine")
  for it in (0, 10, 37, 99):
    assert float(p(it)) == pytest.approx((1 - it / 100) ** 0.9, rel=1e-6)
  assert float(c(0)) == pytest.approx(0.1, rel=1e-6)
  assert float(c(5)) == pytest.approx(1 - 0.5 * 0.9, rel=1e-6)
  assert float(c(60)) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.6)), rel=1e-5)
  with pytest.raises(ValueError, match="train.schedule"):
    make_schedule(1.0, num_steps=10, warmup_steps=0, warmup_ratio=0.0, kind="step")


def _train_cfg(**overrides):
  tc = get_config().train
  tc.unlock()
  tc.update(overrides)
  return tc


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_adamw_matches_torch_polywarmup(grad_clip):
  """70 updates (across warm-up) of optax vs torch.optim.AdamW with WeCLIP's per-step lr."""
  torch = pytest.importorskip("torch")
  tc = _train_cfg(
    learning_rate=2e-2, num_steps=100, warmup_steps=50, warmup_ratio=1e-6, grad_clip=grad_clip
  )
  tx, _ = make_optimizer(tc)
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5, 3)).astype(np.float64)
  grads = rng.normal(size=(70, 5, 3)) * 3

  params = {"w": jnp.asarray(w0, jnp.float32)}
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    u, opt_state = update({"w": jnp.asarray(g, jnp.float32)}, opt_state, params)
    params = optax.apply_updates(params, u)

  p = torch.nn.Parameter(torch.tensor(w0))
  opt = torch.optim.AdamW([p], lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  for it, g in enumerate(grads):
    for group in opt.param_groups:
      group["lr"] = weclip_lr(it, lr0=2e-2, warmup=50, ratio=1e-6, max_it=100, power=1.0)
    p.grad = torch.tensor(g)
    if grad_clip > 0:
      torch.nn.utils.clip_grad_norm_([p], grad_clip)
    opt.step()
  np.testing.assert_allclose(np.asarray(params["w"]), p.detach().numpy(), rtol=1e-5, atol=1e-6)
