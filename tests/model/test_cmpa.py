"""Cross-modal prototype alignment (method §2) against numpy InfoNCE."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.model import cmpa

C1 = 5  # bg + 4 foreground classes.


def _jit(fn, **kw):
  return jax.jit(functools.partial(fn, **kw))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nce_np(x, cls, text, tau, num_bg):
  logits = text @ x / tau
  lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
  pos = logits[:num_bg].max() if cls == 0 else logits[num_bg + cls - 1]
  return lse - pos


def _labels():
  lab = np.array(
    [
      [0, 0, 0, 1, 1, 1, 3, 255, 255, 0, 1, 0],  # Class 3 has one patch: invalid.
      [2, 2, 0, 0, 4, 4, 4, 255, 0, 2, 2, 0],
    ],
    np.int32,
  )
  return lab


def test_prototypes_match_numpy_masked_average():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 12, 6)).astype(np.float32)
  lab = _labels()
  protos, valid = _jit(cmpa.prototypes, num_classes=C1, min_pixels=2)(feats, lab)
  protos, valid = np.asarray(protos), np.asarray(valid)
  for b in range(2):
    for c in range(C1):
      sel = lab[b] == c
      assert valid[b, c] == (sel.sum() >= 2)
      if sel.any():
        np.testing.assert_allclose(protos[b, c], _unit(feats[b, sel].mean(0)), rtol=1e-5)
      else:
        np.testing.assert_array_equal(protos[b, c], 0.0)
  np.testing.assert_array_equal(valid, [[1, 1, 0, 0, 0], [1, 0, 1, 0, 1]])


def test_soft_prototypes_match_numpy_weighted_average():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(2, 12, 6)).astype(np.float32)
  w = rng.random((2, C1, 12)).astype(np.float32)
  w[1, 2] = 0.0
  protos, valid = _jit(cmpa.soft_prototypes, min_weight=3.0)(feats, w)
  for b in range(2):
    for c in range(C1):
      assert valid[b, c] == (w[b, c].sum() >= 3.0)
      if w[b, c].sum() > 0:
        np.testing.assert_allclose(protos[b, c], _unit(w[b, c] @ feats[b]), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(protos[1, 2], 0.0)


def test_text_prototypes_modes():
  rng = np.random.default_rng(2)
  fg = _unit(rng.normal(size=(4, 8))).astype(np.float32)
  bg = _unit(rng.normal(size=(3, 8))).astype(np.float32)
  mean = np.asarray(_jit(cmpa.text_prototypes, bg_mode="mean")(fg, bg))
  best = np.asarray(_jit(cmpa.text_prototypes, bg_mode="best")(fg, bg))
  np.testing.assert_allclose(mean[0], _unit(bg.mean(0)), rtol=1e-6)
  np.testing.assert_allclose(mean[1:], fg, rtol=1e-6)
  np.testing.assert_allclose(best, np.concatenate([bg, fg]), rtol=1e-6)
  with pytest.raises(ValueError, match="bg_mode"):
    cmpa.text_prototypes(fg, bg, bg_mode="max")


@pytest.mark.parametrize("bg_mode,num_bg", [("mean", 1), ("best", 3)])
def test_cmpa_loss_matches_numpy_infonce(bg_mode, num_bg):
  rng = np.random.default_rng(3)
  text = np.asarray(
    cmpa.text_prototypes(rng.normal(size=(4, 8)), rng.normal(size=(3, 8)), bg_mode=bg_mode)
  )
  protos = _unit(rng.normal(size=(2, C1, 8))).astype(np.float32)
  protos[0, 0] = text[num_bg - 1] + 0.3 * protos[0, 0]  # bg close to the last bg name.
  protos[0, 2] = 100.0  # Invalid entries are ignored whatever they hold.
  valid = np.array([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]], bool)
  fn = _jit(cmpa.cmpa_loss, temperature=0.07, num_bg=num_bg)
  loss = float(fn(protos, valid, text))
  ref = np.mean(
    [
      _nce_np(protos[b, c].astype(np.float64), c, text.astype(np.float64), 0.07, num_bg)
      for b in range(2)
      for c in range(C1)
      if valid[b, c]
    ]
  )
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  with pytest.raises(ValueError, match="num_bg"):
    cmpa.cmpa_loss(protos, valid, text, temperature=0.07, num_bg=num_bg + 1)


def test_cmpa_gradient_skips_invalid_and_ignored_patches():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(2, 12, 8)).astype(np.float32)
  text = np.asarray(cmpa.text_prototypes(rng.normal(size=(4, 8)), rng.normal(size=(3, 8))))
  lab = _labels()

  def loss(z):
    protos, valid = cmpa.prototypes(z, lab, num_classes=C1, min_pixels=2)
    return cmpa.cmpa_loss(protos, valid, text, temperature=0.1)

  g = np.asarray(jax.jit(jax.grad(loss))(feats))
  dead = (lab == 255) | ((lab == 3) & (np.arange(2)[:, None] == 0))  # Ignored / invalid class.
  assert dead.sum() == 4
  np.testing.assert_array_equal(g[dead], 0.0)
  assert np.all(np.abs(g[~dead]).sum(-1) > 0)


def test_cmpa_all_empty_labels_give_zero_loss_and_finite_grads():
  rng = np.random.default_rng(5)
  feats = rng.normal(size=(2, 12, 8)).astype(np.float32)
  text = np.asarray(cmpa.text_prototypes(rng.normal(size=(4, 8)), rng.normal(size=(3, 8))))
  lab = np.full((2, 12), 255, np.int32)

  def loss(z):
    protos, valid = cmpa.prototypes(z, lab, num_classes=C1, min_pixels=2)
    return cmpa.cmpa_loss(protos, valid, text, temperature=0.07) + cmpa.pixel_prototype_loss(
      z, lab, text, temperature=0.07
    )

  val, g = jax.jit(jax.value_and_grad(loss))(feats)
  assert float(val) == 0.0
  assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("bg_mode,num_bg", [("mean", 1), ("best", 3)])
def test_pixel_prototype_loss_matches_numpy(bg_mode, num_bg):
  rng = np.random.default_rng(6)
  text = np.asarray(
    cmpa.text_prototypes(rng.normal(size=(4, 8)), rng.normal(size=(3, 8)), bg_mode=bg_mode)
  )
  z = rng.normal(size=(2, 12, 8)).astype(np.float32)
  lab = _labels()
  fn = _jit(cmpa.pixel_prototype_loss, temperature=0.1, num_bg=num_bg)
  loss = float(fn(jnp.asarray(z, jnp.bfloat16).astype(jnp.float32), lab, text))
  z64 = _unit(np.asarray(jnp.asarray(z, jnp.bfloat16).astype(jnp.float32), np.float64))
  ref = np.mean(
    [
      _nce_np(z64[b, i], lab[b, i], text.astype(np.float64), 0.1, num_bg)
      for b in range(2)
      for i in range(12)
      if lab[b, i] != 255
    ]
  )
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
