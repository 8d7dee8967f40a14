"""ISA / TSA heads (method §2.1) against an explicit numpy forward, train and eval mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.model.heads import AlignmentHead


def _np_forward(params, stats, x, *, train, mask, momentum=0.9, eps=1e-5, normalize=True):
  """numpy: Linear (no bias) -> BN -> ReLU per hidden layer, then Linear (+ L2). Returns (y, new
  stats)."""
  x = np.asarray(x, np.float64)
  rows = x.reshape(-1, x.shape[-1])
  keep = np.ones(len(rows), bool) if mask is None else np.asarray(mask).reshape(-1)
  new_stats = {}
  i = 0
  while f"dense_{i}" in params:
    d, bn = params[f"dense_{i}"], params[f"bn_{i}"]
    rows = rows @ np.asarray(d["kernel"])  # No bias before BatchNorm.
    st = stats[f"bn_{i}"]
    if train:
      mean = rows[keep].mean(axis=0)
      var = ((rows[keep] - mean) ** 2).mean(axis=0)  # Biased, as flax (and torch's forward).
      new_stats[f"bn_{i}"] = {
        "mean": momentum * np.asarray(st["mean"]) + (1 - momentum) * mean,
        "var": momentum * np.asarray(st["var"]) + (1 - momentum) * var,
      }
    else:
      mean, var = np.asarray(st["mean"]), np.asarray(st["var"])
    rows = (rows - mean) / np.sqrt(var + eps) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
    rows = np.maximum(rows, 0.0)
    i += 1
  rows = rows @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
  if normalize:
    rows = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
  return rows.reshape(*x.shape[:-1], -1), new_stats


@pytest.mark.parametrize("hidden", [(12,), (12, 10)])
def test_head_train_and_eval_match_numpy(hidden):
  head = AlignmentHead(hidden=hidden, out_dim=6)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 8)).astype(np.float32)  # e.g. [B, K, D] class features.
  mask = rng.random((3, 4)) < 0.7
  mask[0, 0] = True
  x[~mask] = 1e3  # Padding rows far off: they must not enter the statistics.
  variables = head.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
  params, stats = variables["params"], variables["batch_stats"]
  for i in range(len(hidden)):  # Non-trivial affine BN parameters and running stats.
    params[f"bn_{i}"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, hidden[i]), jnp.float32)
    params[f"bn_{i}"]["bias"] = jnp.asarray(rng.normal(size=hidden[i]), jnp.float32)
    stats[f"bn_{i}"]["mean"] = jnp.asarray(rng.normal(size=hidden[i]), jnp.float32)
    stats[f"bn_{i}"]["var"] = jnp.asarray(rng.uniform(0.5, 2.0, hidden[i]), jnp.float32)

  y, updated = jax.jit(
    lambda p, s, x, m: head.apply(
      {"params": p, "batch_stats": s}, x, train=True, mask=m, mutable=["batch_stats"]
    )
  )(params, stats, x, mask)
  want, want_stats = _np_forward(params, stats, x, train=True, mask=mask)
  np.testing.assert_allclose(np.asarray(y)[mask], want[mask], rtol=1e-4, atol=1e-5)
  for name, st in want_stats.items():
    for k in ("mean", "var"):
      np.testing.assert_allclose(updated["batch_stats"][name][k], st[k], rtol=1e-4, atol=1e-5)

  y_eval = head.apply({"params": params, "batch_stats": stats}, x, train=False)
  want_eval, _ = _np_forward(params, stats, x, train=False, mask=None)
  np.testing.assert_allclose(np.asarray(y_eval)[mask], want_eval[mask], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y_eval), axis=-1), 1.0, rtol=1e-5)


def test_head_shapes_and_default_widths():
  head = AlignmentHead()  # [inferred] default: 512 -> 512 -> BN -> ReLU -> 256.
  v = head.init(jax.random.PRNGKey(0), jnp.zeros((2, 512)), train=False)
  shapes = jax.tree.map(lambda a: a.shape, v)
  assert shapes["params"]["dense_0"]["kernel"] == (512, 512)
  assert shapes["params"]["out"]["kernel"] == (512, 256)
  assert shapes["batch_stats"]["bn_0"] == {"mean": (512,), "var": (512,)}
  raw = AlignmentHead(hidden=(), out_dim=3, normalize=False)
  p = raw.init(jax.random.PRNGKey(1), jnp.ones((5, 4)), train=True)
  assert "batch_stats" not in p
  x = np.arange(20, dtype=np.float32).reshape(5, 4)
  want = x @ np.asarray(p["params"]["out"]["kernel"]) + np.asarray(p["params"]["out"]["bias"])
  np.testing.assert_allclose(raw.apply(p, x, train=True), want, rtol=1e-6, atol=1e-5)
