"""Affinity propagation, box masks, PAR, pseudo labels (method §1.4) vs numpy/scipy/torch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from ssr_jax.model import affinity


def _jit(fn, **kw):
  return jax.jit(functools.partial(fn, **kw))


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _attention(rng, layers, b, n, cls_boost):
  """Head-averaged-like attention [L, B, 1+N, 1+N]; cls_boost[l] shifts mass onto CLS."""
  logits = rng.normal(size=(layers, b, 1 + n, 1 + n)) * 2.0
  logits[..., 0] += np.asarray(cls_boost)[:, None, None]
  return _softmax(logits).astype(np.float32)


# ------------------------------------------------------------------ affinity sources


def test_attention_affinity_is_mean_of_last_layers_without_cls():
  rng = np.random.default_rng(0)
  attn = _attention(rng, 12, 2, 16, np.zeros(12))
  out = _jit(affinity.attention_affinity, num_layers=8)(attn)
  np.testing.assert_allclose(out, attn[-8:, :, 1:, 1:].mean(0), rtol=1e-6, atol=1e-7)


def test_rfm_affinity_layer_selection_matches_numpy():
  rng = np.random.default_rng(1)
  b, n, layers, num = 2, 16, 12, 6
  attn = _attention(rng, layers, b, n, np.linspace(-2.0, 3.0, layers))
  feats = (rng.normal(size=(b, n, 8)) * 0.3).astype(np.float32)
  out = np.asarray(_jit(affinity.rfm_affinity, num_layers=num)(attn, feats))
  for i in range(b):
    f = feats[i].astype(np.float64)
    s = 1.0 / (1.0 + np.exp(-f @ f.T))
    a = attn[-num:, i, 1:, 1:].astype(np.float64)
    d = (s[None] - a).sum(axis=(1, 2))
    keep = d <= d.mean()
    assert 0 < keep.sum() < num  # The selection is non-trivial here.
    assert np.abs(d - d.mean()).min() > 1e-2  # ...and not decided by rounding.
    ref = (keep[:, None, None] * a).sum(0) / (keep.sum() + 1e-5) * s
    np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-7)


def test_rfm_affinity_stops_gradient_to_features():
  rng = np.random.default_rng(2)
  attn = _attention(rng, 4, 1, 9, np.zeros(4))
  feats = rng.normal(size=(1, 9, 4)).astype(np.float32)
  g = jax.grad(lambda f: affinity.rfm_affinity(attn, f, num_layers=3).sum())(feats)
  assert np.all(np.asarray(g) == 0)


# ------------------------------------------------------------------ transition matrix


def _trans_np(w, iters=3, square=True):
  t = w.astype(np.float64)
  for _ in range(iters):
    t = t / t.sum(axis=0, keepdims=True)
    t = t / t.sum(axis=1, keepdims=True)
  t = (t + t.T) / 2
  return t @ t if square else t


def test_transition_matrix_matches_numpy_and_is_doubly_stochastic():
  rng = np.random.default_rng(3)
  w = _attention(rng, 1, 3, 36, np.zeros(1))[0, :, 1:, 1:]
  half = np.asarray(_jit(affinity.transition_matrix, square=False)(w))
  full = np.asarray(_jit(affinity.transition_matrix)(w))
  for i in range(3):
    np.testing.assert_allclose(half[i], _trans_np(w[i], square=False), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(full[i], _trans_np(w[i]), rtol=1e-5, atol=1e-8)
  # Symmetric, and after 3 Sinkhorn rounds rows/columns sum to ~1 (rows exactly before the
  # symmetrisation, which averages them with the columns; peaky attention converges slowly).
  np.testing.assert_allclose(half, np.swapaxes(half, 1, 2), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(full, np.swapaxes(full, 1, 2), rtol=1e-5, atol=1e-8)
  for axis in (1, 2):
    assert np.abs(half.sum(axis) - 1).max() < 0.1 and np.abs(half.sum(axis) - 1).mean() < 1e-2
  mild = np.asarray(_jit(affinity.transition_matrix, square=False)(rng.random((1, 30, 30)) + 0.5))
  np.testing.assert_allclose(mild.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(full, np.einsum("bij,bjk->bik", half, half), rtol=1e-5, atol=1e-8)


def test_transition_matrix_accepts_bfloat16_and_computes_float32():
  rng = np.random.default_rng(4)
  w = rng.random((2, 16, 16)).astype(np.float32) + 0.1
  out = _jit(affinity.transition_matrix)(jnp.asarray(w, jnp.bfloat16))
  assert out.dtype == jnp.float32
  ref = _trans_np(np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32))[0])
  np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ box masks


def _box_mask_np(cam, threshold):
  """WeCLIP's scoremap2bbox (uint8, strict threshold, contour boxes with the exclusive-end
  quirk) with scipy's 8-connected components standing in for cv2 contours."""
  h, w = cam.shape
  q = (cam * 255).astype(np.uint8)
  fg = q > int(threshold * np.max(q))
  lab, _ = ndi.label(fg, structure=np.ones((3, 3)))
  m = np.zeros((h, w), np.float32)
  for sl in ndi.find_objects(lab):
    y0, y1 = sl[0].start, min(sl[0].stop, h - 1)
    x0, x1 = sl[1].start, min(sl[1].stop, w - 1)
    m[y0:y1, x0:x1] = 1
  return m.reshape(-1)


def _hand_maps(h=12, w=16):
  maps = []
  m = np.zeros((h, w))  # Ring with a blob in its hole (nested contours) and a separate blob.
  m[1:8, 1:8] = 1
  m[2:7, 2:7] = 0
  m[4, 4] = 1
  m[9:11, 10:13] = 1
  maps.append(m)
  m = np.zeros((h, w))  # Squares touching at a corner: one 8-connected component.
  m[1:3, 1:3] = 1
  m[3:5, 3:5] = 1
  m[6:8, 9:11] = 1
  m[8:10, 7:9] = 1
  maps.append(m)
  m = np.zeros((h, w))  # Components on the last row / column: their box loses that row/column.
  m[h - 3 :, 2:5] = 1
  m[3:6, w - 2 :] = 1
  m[h - 1, w - 1] = 1  # A lone corner pixel gives an empty box.
  maps.append(m)
  m = np.zeros((h, w))  # A spiral: a long geodesic path inside one component.
  y0, y1, x0, x1 = 0, h - 1, 0, w - 1
  while y0 <= y1 and x0 <= x1:
    m[y0, x0 : x1 + 1] = 1
    m[y0 : y1 + 1, x1] = 1
    m[y1, x0 : x1 + 1] = 1
    m[y0 + 2 : y1 + 1, x0] = 1
    if y0 + 2 <= y1:
      m[y0 + 2, x0 : x0 + 2] = 1
    y0, y1, x0, x1 = y0 + 2, y1 - 2, x0 + 2, x1 - 2
  maps.append(m * 0.8)
  maps.append(np.zeros((h, w)))  # Empty.
  maps.append(np.full((h, w), 0.5))  # Constant: everything foreground.
  return np.stack(maps).astype(np.float32)


@pytest.mark.parametrize("threshold", [0.4, 0.7])
def test_box_masks_match_connected_component_boxes(threshold):
  rng = np.random.default_rng(5)
  smooth = ndi.gaussian_filter(rng.random((3, 4, 12, 16)), (0, 0, 1.2, 1.2))
  smooth -= smooth.min(axis=(2, 3), keepdims=True)
  smooth /= smooth.max(axis=(2, 3), keepdims=True)
  noisy = rng.random((1, 4, 12, 16)) ** 3
  hand = _hand_maps()
  cams = np.concatenate([smooth, noisy, hand[None, :4], hand[None, 2:]]).astype(np.float32)
  out = np.asarray(_jit(affinity.box_masks, threshold=threshold)(cams))
  assert out.shape == (6, 4, 12 * 16) and out.dtype == np.float32
  for b in range(cams.shape[0]):
    for k in range(cams.shape[1]):
      np.testing.assert_array_equal(out[b, k], _box_mask_np(cams[b, k], threshold), f"{b},{k}")
  assert out[5, 2].sum() == 0  # The empty map.
  assert out[5, 3].reshape(12, 16)[:11, :15].all() and out[5, 3].sum() == 11 * 15


def test_box_masks_long_snake_component_converges_past_the_unchecked_steps():
  # A boustrophedon path through a 20x20 grid: one component whose far end is ~200 steps away,
  # well past the unchecked steps, so the convergence loop must finish it. Its box is the
  # path's extent; a separate dot elsewhere keeps its own box.
  cam = np.zeros((20, 20), np.float32)
  for r in range(0, 17, 2):
    cam[r, 1:19] = 1.0
    cam[r + 1, 18 if r % 4 == 0 else 1] = 1.0
  cam[19, 19] = 1.0
  out = np.asarray(_jit(affinity.box_masks, threshold=0.4)(cam[None, None]))
  np.testing.assert_array_equal(out[0, 0], _box_mask_np(cam, 0.4))
  assert out[0, 0].reshape(20, 20)[:18, 1:19].all()


def test_box_mask_threshold_uses_reference_quantisation():
  # For every uint8 maximum q: a pixel at int(0.7 * q) is background, one above is foreground.
  q = np.arange(1, 256)
  thr = np.array([int(0.7 * np.uint8(v)) for v in q])
  cams = np.zeros((2, q.size, 4, 4), np.float32)
  cams[:, :, 0, 0] = (q + 0.5) / 255  # (x * 255).astype(uint8) -> q exactly.
  cams[0, :, 2, 2] = (thr + 0.5) / 255
  cams[1, :, 2, 2] = (np.minimum(thr + 1, q) + 0.5) / 255
  out = np.asarray(_jit(affinity.box_masks, threshold=0.7)(cams)).reshape(2, q.size, 4, 4)
  assert not out[0, :, 2, 2].any()
  np.testing.assert_array_equal(out[1, :, 2, 2], thr + 1 <= q - 0)
  for k in range(0, q.size, 17):
    np.testing.assert_array_equal(out[1, k].reshape(-1), _box_mask_np(cams[1, k], 0.7))


# ------------------------------------------------------------------ propagation and refinement


def test_propagate_with_masks_matches_numpy():
  rng = np.random.default_rng(6)
  b, k, n = 2, 3, 20
  trans = rng.random((b, n, n)).astype(np.float32)
  cams = rng.random((b, k, n)).astype(np.float32)
  ones = np.ones((b, k, n), np.float32)
  src = (rng.random((b, k, n)) > 0.5).astype(np.float32)
  recv = (rng.random((b, k, n)) > 0.3).astype(np.float32)
  prop = jax.jit(affinity.propagate)
  out_all = np.asarray(prop(trans, cams, ones))
  out_src = np.asarray(prop(trans, cams, src))
  out_rs = np.asarray(prop(trans, cams, src, recv_mask=recv))
  for i in range(b):
    for c in range(k):
      np.testing.assert_allclose(out_all[i, c], trans[i] @ cams[i, c], rtol=1e-5)
      masked = trans[i] * src[i, c][None, :]  # Columns = source patches.
      np.testing.assert_allclose(out_src[i, c], masked @ cams[i, c], rtol=1e-5, atol=1e-7)
      ref = (masked * recv[i, c][:, None]) @ cams[i, c]
      np.testing.assert_allclose(out_rs[i, c], ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bg_power", [1.0, 2.0])
def test_refine_cams_matches_numpy_and_torch_resize(bg_power):
  rng = np.random.default_rng(7)
  b, k, h, w, out_size = 2, 3, 4, 5, (16, 20)
  cams = rng.random((b, k, h, w)).astype(np.float32)
  trans = rng.random((b, h * w, h * w)).astype(np.float32)
  src = (rng.random((b, k, h * w)) > 0.4).astype(np.float32)
  src[0, 1] = 0  # An empty box: the class map stays zero.
  valid = np.array([[True, True, False], [True, False, False]])
  fn = _jit(affinity.refine_cams, out_size=out_size, bg_power=bg_power)
  out = np.asarray(fn(cams, trans, src, valid=valid))
  assert out.shape == (b, 1 + k, *out_size)
  for i in range(b):
    maps = []
    for c in range(k):
      p = (trans[i].astype(np.float64) * src[i, c][None]) @ cams[i, c].reshape(-1)
      p = p - p.min()
      p = p / (p.max() + 1e-7)  # scale_cam_image: normalise, then resize.
      up = torch.nn.functional.interpolate(
        torch.tensor(p.reshape(1, 1, h, w)), size=out_size, mode="bilinear", align_corners=False
      )[0, 0].numpy()
      maps.append(up if valid[i, c] else np.zeros(out_size))
    maps = np.stack(maps)
    bg = np.maximum(1 - maps.max(0), 0) ** bg_power
    np.testing.assert_allclose(out[i, 1:], maps, atol=2e-6)
    np.testing.assert_allclose(out[i, 0], bg, atol=2e-5)
  assert np.all(out[0, 2] == 0)  # The empty-box class.


# ------------------------------------------------------------------ PAR


def _par_np(img, probs, dilations, iters, w_pos=0.01, temp=0.3):
  """Straight loop version of AFA's PAR (replicate padding = clamped coordinates)."""
  hh, ww, _ = img.shape
  offsets, dist = [], []
  for d in dilations:
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        if dy or dx:
          offsets.append((dy * d, dx * d))
          dist.append(d * np.sqrt(2) if dy and dx else float(d))
  dist = np.array(dist)
  pos = _softmax(-((dist / (dist.std(ddof=1) + 1e-8) / temp) ** 2))
  img = img.astype(np.float64)

  def nb(a, y, x):
    return np.stack(
      [a[min(max(y + oy, 0), hh - 1), min(max(x + ox, 0), ww - 1)] for oy, ox in offsets]
    )

  aff = np.zeros((hh, ww, len(offsets)))
  for y in range(hh):
    for x in range(ww):
      n = nb(img, y, x)
      a = -((np.abs(n - img[y, x]) / (n.std(axis=0, ddof=1) + 1e-8) / temp) ** 2)
      aff[y, x] = _softmax(a.mean(axis=1)) + w_pos * pos
  p = probs.astype(np.float64)
  for _ in range(iters):
    p = np.stack([[aff[y, x] @ nb(p, y, x) for x in range(ww)] for y in range(hh)])
  return p


def test_par_matches_numpy_loop():
  rng = np.random.default_rng(8)
  img = rng.normal(size=(2, 12, 10, 3)).astype(np.float32)
  img[0, :6] += 2.0  # An edge, so the affinities are far from uniform.
  probs = rng.random((2, 12, 10, 3)).astype(np.float32)
  out = np.asarray(_jit(affinity.par, dilations=(1, 2), iters=3)(img, probs))
  for i in range(2):
    np.testing.assert_allclose(out[i], _par_np(img[i], probs[i], (1, 2), 3), rtol=2e-5, atol=1e-6)


def test_par_default_dilations_compile_on_small_image():
  rng = np.random.default_rng(9)
  img = jnp.asarray(rng.normal(size=(1, 16, 16, 3)), jnp.bfloat16)
  probs = jnp.asarray(rng.random((1, 16, 16, 2)), jnp.float32)
  out = jax.jit(affinity.par)(img, probs)
  assert out.shape == (1, 16, 16, 2) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))


# ------------------------------------------------------------------ pseudo labels


def test_pseudo_labels_map_slots_to_class_ids_and_skip_padding():
  probs = np.zeros((1, 2, 3, 4), np.float32)  # bg + 3 slots.
  probs[0, 0, 0] = [0.9, 0.1, 0.2, 5.0]  # Slot 3 is padding: bg wins.
  probs[0, 0, 1] = [0.1, 0.7, 0.2, 5.0]  # Slot 1 -> class 14 -> label 15.
  probs[0, 0, 2] = [0.1, 0.2, 0.8, 0.0]  # Slot 2 -> class 2 -> label 3.
  probs[0, 1, 0] = [0.5, 0.5, 0.5, 0.5]  # Tie: lowest slot (bg).
  probs[0, 1, 1] = [0.1, 0.6, 0.6, 0.0]  # Tie between fg slots: the first.
  probs[0, 1, 2] = [0.0, 0.0, 0.0, 0.0]
  ids = np.array([[14, 2, -1]], np.int32)
  out = np.asarray(jax.jit(affinity.pseudo_labels)(probs, ids))
  np.testing.assert_array_equal(out, [[[0, 15, 3], [0, 15, 0]]])
  assert out.dtype == np.int32
  # An explicit validity mask overrides the -1 convention (padded ids may be any value).
  out2 = jax.jit(affinity.pseudo_labels)(probs, np.array([[14, 2, 0]]), np.array([[1, 1, 0]]))
  np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("axis", [1, -1])
def test_background_is_clamped_power_of_one_minus_max(axis):
  cams = np.array([[0.2, 0.5], [1.0 + 1e-6, 0.0], [0.0, 0.0]], np.float32)  # [3 pixels, K=2]
  x = cams.T[None] if axis == 1 else cams  # [1, K, 3] or [3, K]
  bg = np.asarray(affinity.background(jnp.asarray(x), 0.5, axis=axis))
  want = np.array([0.5**0.5, 0.0, 1.0], np.float32)  # max above 1 clamps to 0, not NaN.
  np.testing.assert_allclose(bg.reshape(-1), want, rtol=1e-6)
  assert bg.shape == ((1, 1, 3) if axis == 1 else (3, 1))
