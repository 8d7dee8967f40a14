"""CMPA class features, K-means and the prototype loss (method §2.3-2.5) against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.model import prototypes as pt


def test_cam_weighted_pool_matches_loops():
  rng = np.random.default_rng(0)
  b, k, h, w, d = 2, 3, 3, 4, 5
  feats = rng.normal(size=(b, h * w, d)).astype(np.float32)
  cams = rng.random((b, k, h, w)).astype(np.float32)
  cams[1, 2] = 0.0  # All-zero map: feature ~0, not NaN.
  valid = np.array([[True, True, False], [True, False, True]])
  got = np.asarray(pt.cam_weighted_pool(feats, cams, valid, eps=1e-5))
  for bi in range(b):
    for ki in range(k):
      want = np.zeros(d)
      if valid[bi, ki]:
        wsum = 0.0
        for n in range(h * w):
          m = cams[bi, ki].reshape(-1)[n]
          want += m * feats[bi, n]
          wsum += m
        want /= wsum + 1e-5
      np.testing.assert_allclose(got[bi, ki], want, rtol=1e-5, atol=1e-6)
  # Hand case: weights (1, 3) on features 2 and 6 -> (2 + 18) / 4 = 5.
  one = pt.cam_weighted_pool(np.array([[[2.0], [6.0]]]), np.array([[[1.0, 3.0]]]), eps=0.0)
  assert float(one[0, 0, 0]) == 5.0


def _np_lloyd(x, init, mask, iters):
  """Textbook Lloyd loop: explicit per-sample nearest centroid, per-cluster mean."""
  c = np.array(init, np.float64)
  idx = [i for i in range(len(x)) if mask[i]]

  def nearest(cents):
    return {i: int(np.argmin([np.sum((x[i] - cj) ** 2) for cj in cents])) for i in idx}

  for _ in range(iters):
    a = nearest(c)
    for j in range(len(c)):
      members = [x[i] for i in idx if a[i] == j]
      if members:  # An empty cluster keeps its centroid.
        c[j] = np.mean(members, axis=0)
  a = nearest(c)
  return c, np.array([a.get(i, -1) for i in range(len(x))])


@pytest.mark.parametrize("iters", [0, 1, 4])
def test_kmeans_matches_numpy_lloyd(iters):
  rng = np.random.default_rng(1)
  centres = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [20.0, 20.0, 20.0]])
  x = np.concatenate([c + rng.normal(scale=1.2, size=(12, 3)) for c in centres[:3]])
  # Masked rows sit on the 4th initial centroid: if they counted, cluster 3 would not be empty.
  x = np.concatenate([x, centres[3] + rng.normal(scale=0.1, size=(4, 3))]).astype(np.float32)
  mask = np.ones(len(x), bool)
  mask[-4:] = False
  mask[[3, 17]] = False
  init = (centres + rng.normal(scale=1.0, size=centres.shape)).astype(np.float32)
  init[1] = [2.0, 1.0, 0.0]  # Between two blobs, so assignments move across iterations.

  c, a = jax.jit(pt.kmeans, static_argnames="iters")(x, init, mask, iters=iters)
  want_c, want_a = _np_lloyd(x.astype(np.float64), init, mask, iters)
  np.testing.assert_allclose(c, want_c, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(a, want_a)
  assert (np.asarray(a)[~mask] == -1).all()
  np.testing.assert_array_equal(c[3], init[3])  # Empty cluster: its initial centroid.
  if iters:
    assert not np.allclose(c[1], init[1])


def test_class_means_with_fallback():
  x = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [9.0, 9.0]], np.float32)
  labels = np.array([0, 0, 2, 1])
  mask = np.array([True, True, True, False])
  fallback = np.array([[7.0, 7.0], [8.0, 8.0], [6.0, 6.0]], np.float32)
  got = pt.class_means(x, labels, mask, num_classes=3, fallback=fallback)
  np.testing.assert_array_equal(got, [[2.0, 1.0], [8.0, 8.0], [5.0, 5.0]])


def _np_ce(f, p, t, v, tau, normalize=True):
  f = np.asarray(f, np.float64).reshape(-1, f.shape[-1])
  p = np.asarray(p, np.float64)
  if normalize:
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
  total, count = 0.0, 0
  for fi, ti, vi in zip(f, np.ravel(t), np.ravel(v)):
    if not vi:
      continue
    s = [float(fi @ pk) / tau for pk in p]
    total += -(s[ti] - np.log(np.sum(np.exp(s))))
    count += 1
  return total / max(count, 1)


def test_prototype_loss_matches_numpy_and_tau_is_learnable():
  rng = np.random.default_rng(2)
  f_img = rng.normal(size=(2, 3, 6)).astype(np.float32)  # [B, K, d]
  f_txt = rng.normal(size=(2, 3, 6)).astype(np.float32)
  p_t = rng.normal(size=(4, 6)).astype(np.float32)
  p_i = rng.normal(size=(4, 6)).astype(np.float32)
  t_img = np.array([[0, 3, 1], [2, 2, 0]])
  t_txt = np.array([[0, 3, 1], [2, 1, 0]])
  valid = np.array([[True, True, False], [True, False, True]])
  log_tau = pt.init_log_temperature()
  assert float(jnp.exp(log_tau)) == pytest.approx(0.05)

  got = pt.prototype_ce(f_img, p_t, t_img, valid, log_temperature=log_tau)
  assert float(got) == pytest.approx(_np_ce(f_img, p_t, t_img, valid, 0.05), rel=1e-5)
  raw = pt.prototype_ce(f_img, p_t, t_img, valid, log_temperature=0.0, normalize=False)
  assert float(raw) == pytest.approx(_np_ce(f_img, p_t, t_img, valid, 1.0, False), rel=1e-5)

  def total(lt):
    return pt.cmpa_prototype_loss(
      f_img,
      t_img,
      valid,
      p_t,
      log_temperature=lt,
      f_text=f_txt,
      text_targets=t_txt,
      text_valid=valid,
      image_prototypes=p_i,
      symmetric_weight=0.5,
    )

  want = _np_ce(f_img, p_t, t_img, valid, 0.05) + 0.5 * _np_ce(f_txt, p_i, t_txt, valid, 0.05)
  assert float(total(log_tau)) == pytest.approx(want, rel=1e-5)
  # d L / d log tau against float64 central differences of the numpy loss.
  h = 1e-4

  def np_total(lt):
    tau = np.exp(lt)
    return _np_ce(f_img, p_t, t_img, valid, tau) + 0.5 * _np_ce(f_txt, p_i, t_txt, valid, tau)

  lt0 = float(log_tau)
  fd = (np_total(lt0 + h) - np_total(lt0 - h)) / (2 * h)
  assert float(jax.grad(total)(log_tau)) == pytest.approx(fd, rel=1e-3)
  # No valid sample: 0, not NaN.
  none = pt.prototype_ce(f_img, p_t, t_img, np.zeros_like(valid), log_temperature=log_tau)
  assert float(none) == 0.0
