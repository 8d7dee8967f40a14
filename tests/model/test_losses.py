"""WeCLIP's losses (method §1.6) against torch and numpy double loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssr_jax.model import losses


def _jit(fn, **kw):
  return jax.jit(functools.partial(fn, **kw))


def _balanced_ce_torch(logits, labels):
  """The reference get_seg_loss, with an empty pixel set counted as 0 instead of NaN."""
  pred = torch.tensor(logits).permute(0, 3, 1, 2).double()
  label = torch.tensor(labels).long()
  parts = []
  for keep in (label == 0, (label != 0) & (label != 255)):
    sub = torch.where(keep, label, torch.full_like(label, 255))
    parts.append(0.0 if not keep.any() else float(F.cross_entropy(pred, sub, ignore_index=255)))
  return 0.5 * parts[0] + 0.5 * parts[1]


@pytest.mark.parametrize("case", ["mixed", "no_bg", "no_fg", "all_ignored"])
def test_balanced_ce_matches_torch(case):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 7, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=(2, 6, 7))
  labels[rng.random(labels.shape) < 0.2] = 255
  if case == "no_bg":
    labels[labels == 0] = 2
  elif case == "no_fg":
    labels[(labels != 0) & (labels != 255)] = 0
  elif case == "all_ignored":
    labels[:] = 255
  fn = _jit(losses.balanced_ce)
  out = float(fn(jnp.asarray(logits), jnp.asarray(labels, jnp.uint8)))
  np.testing.assert_allclose(out, _balanced_ce_torch(logits, labels), rtol=1e-5, atol=1e-7)
  g = np.asarray(jax.jit(jax.grad(losses.balanced_ce))(logits, labels))
  assert np.all(np.isfinite(g))
  assert (case == "all_ignored") == np.all(g == 0)


def test_balanced_ce_accepts_bfloat16_logits():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(1, 4, 4, 3)), jnp.bfloat16)
  labels = rng.integers(0, 3, size=(1, 4, 4))
  out = jax.jit(losses.balanced_ce)(logits, labels)
  assert out.dtype == jnp.float32
  ref = _balanced_ce_torch(np.asarray(logits.astype(jnp.float32)), labels)
  np.testing.assert_allclose(float(out), ref, rtol=1e-5)


def _aff_targets_np(lab, radius, ignore=255):
  """The reference's get_mask_by_radius + cams_to_affinity_label, as explicit loops."""
  h, w = lab.shape
  n = h * w
  window = np.zeros((n, n), bool)
  for i in range(n):
    r, c = divmod(i, w)
    for r2 in range(max(0, r - radius), min(h, r + radius + 1)):
      for c2 in range(max(0, c - radius), min(w, c + radius + 1)):
        window[i, r2 * w + c2] = window[r2 * w + c2, i] = True
  flat = lab.reshape(-1)
  t = np.zeros((n, n), np.int64)
  for i in range(n):
    for j in range(n):
      if not window[i, j] or flat[i] == ignore or flat[j] == ignore:
        t[i, j] = ignore
      else:
        t[i, j] = int(flat[i] == flat[j])
  return t


def test_affinity_targets_and_loss_match_double_loops():
  rng = np.random.default_rng(2)
  lab = rng.integers(0, 3, size=(2, 5, 6))
  lab[0, 1, 2] = lab[1, 4, 5] = 255
  pred = rng.random((2, 30, 30)).astype(np.float32)
  t = np.asarray(_jit(losses.affinity_targets, radius=2)(lab))
  ref_t = np.stack([_aff_targets_np(lab[i], 2) for i in range(2)])
  np.testing.assert_array_equal(t, ref_t)
  assert (ref_t == 255).any() and (ref_t == 0).any() and (ref_t == 1).any()
  out = float(_jit(losses.affinity_loss, radius=2)(pred, lab))
  pos = neg = pos_cnt = neg_cnt = 0.0
  for b in range(2):
    for i in range(30):
      for j in range(30):
        if ref_t[b, i, j] == 1:
          pos += 1 - pred[b, i, j]
          pos_cnt += 1
        elif ref_t[b, i, j] == 0:
          neg += pred[b, i, j]
          neg_cnt += 1
  ref = 0.5 * pos / (pos_cnt + 1) + 0.5 * neg / (neg_cnt + 1)
  np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_affinity_loss_gradient_flows_to_predictions():
  lab = np.zeros((1, 3, 3), np.int32)
  lab[0, 0] = 1
  g = np.asarray(
    jax.grad(lambda a: losses.affinity_loss(a, lab, radius=8))(np.full((1, 9, 9), 0.5))
  )
  t = _aff_targets_np(lab[0], 8)
  np.testing.assert_allclose(g[0][t == 1], -0.5 / ((t == 1).sum() + 1), rtol=1e-6)
  np.testing.assert_allclose(g[0][t == 0], 0.5 / ((t == 0).sum() + 1), rtol=1e-6)


@pytest.mark.parametrize("shape,size", [((320, 320), (20, 20)), ((48, 36), (20, 15))])
def test_downsample_labels_matches_torch_nearest(shape, size):
  rng = np.random.default_rng(3)
  lab = rng.integers(0, 256, size=(2, *shape)).astype(np.int32)
  out = np.asarray(jax.jit(losses.downsample_labels, static_argnums=1)(lab, size))
  ref = F.interpolate(torch.tensor(lab[:, None]).float(), size=size, mode="nearest")
  np.testing.assert_array_equal(out, ref[:, 0].numpy().astype(np.int32))
  assert out.dtype == np.int32
