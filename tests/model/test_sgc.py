"""Superpixel-guided correction (method §3) against numpy loops."""

import functools

import jax
import numpy as np
import scipy.ndimage as ndi

from ssr_jax.model import affinity, sgc

P, HH, WW, S = 8, 24, 32, 16  # Patch size, pixels, S_max; grid 3 x 4 (N = 12).
H, W = HH // P, WW // P


def _jit(fn, **kw):
  return jax.jit(functools.partial(fn, **kw))


def _superpixels(rng, b, n_seeds=9, pad_rows=0):
  """Voronoi superpixels [B, HH, WW], ids permuted into [0, S + 6) (some >= S), -1 padding."""
  yy, xx = np.mgrid[:HH, :WW]
  out = np.zeros((b, HH, WW), np.int32)
  for i in range(b):
    seeds = rng.uniform((0, 0), (HH, WW), size=(n_seeds, 2))
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    ids = rng.permutation(S + 6)[:n_seeds]
    out[i] = ids[np.argmin(d, axis=-1)]
  if pad_rows:
    out[:, -pad_rows:] = -1
  return out


def _membership_np(sp):
  m = np.zeros((H * W, S))
  for i in range(H):
    for j in range(W):
      block = sp[i * P : (i + 1) * P, j * P : (j + 1) * P].reshape(-1)
      block = block[block >= 0]
      for v in block:
        m[i * W + j, v % S] += 1.0 / block.size
  return m


def test_membership_matches_numpy_with_padding_and_folding():
  rng = np.random.default_rng(0)
  sp = _superpixels(rng, 2, pad_rows=P + 3)  # Last patch row fully padded, one row partly.
  sp[1, :P, :P] = S + 1  # Folds onto id 1.
  sp[1, :P, P : P + 4] = 1
  m = np.asarray(_jit(sgc.membership, patch_size=P, max_superpixels=S)(sp))
  assert m.shape == (2, H * W, S)
  for i in range(2):
    np.testing.assert_allclose(m[i], _membership_np(sp[i]), atol=1e-6)
  sums = m.sum(-1).reshape(2, H, W)
  np.testing.assert_allclose(sums[:, :2], 1.0, atol=1e-6)
  np.testing.assert_array_equal(sums[:, 2], 0.0)  # Fully padded patches.
  np.testing.assert_allclose(m[1, 0, 1], 1.0, atol=1e-6)  # Ids S+1 and 1 share a column.


def _targets_np(cam, m, threshold):
  area = m.sum(0)
  pooled = np.where(area > 0, (m.T @ cam) / np.maximum(area, 1e-12), -np.inf)
  target = (area > 0) & (pooled >= threshold * pooled.max())
  return m @ target.astype(np.float64)


def test_target_masks_match_numpy():
  rng = np.random.default_rng(1)
  sp = _superpixels(rng, 2, pad_rows=4)
  member = np.asarray(_jit(sgc.membership, patch_size=P, max_superpixels=S)(sp))
  cams = rng.random((2, 3, H, W)).astype(np.float32) ** 2
  u = np.asarray(_jit(sgc.target_masks, threshold=0.4)(cams, member))
  uh = np.asarray(_jit(sgc.target_masks, threshold=0.4, hard=True)(cams, member))
  for i in range(2):
    for k in range(3):
      ref = _targets_np(cams[i, k].reshape(-1).astype(np.float64), member[i], 0.4)
      np.testing.assert_allclose(u[i, k], ref, atol=1e-6)
      np.testing.assert_array_equal(uh[i, k], ref >= 0.5)
  assert 0 < u.mean() < 1 and np.any((u > 0) & (u < 1))  # Partial coverage is exercised.


def test_patches_outside_activated_superpixels_do_not_propagate():
  rng = np.random.default_rng(2)
  sp = _superpixels(rng, 1)
  member = _jit(sgc.membership, patch_size=P, max_superpixels=S)(sp)
  cams = np.zeros((1, 1, H, W), np.float32)
  cams[0, 0, :2, :2] = [[1.0, 0.9], [0.8, 0.7]]
  cams += 0.3 * rng.random(cams.shape).astype(np.float32)
  u = np.asarray(_jit(sgc.target_masks, threshold=0.6)(cams, member))
  box = np.ones((1, 1, H * W), np.float32)  # A box covering everything isolates SGC's effect.
  src = box * u
  outside = u[0, 0] == 0
  assert outside.any() and not outside.all()
  trans = np.asarray(jax.jit(affinity.transition_matrix)(rng.random((1, H * W, H * W)) + 0.1))
  prop = jax.jit(affinity.propagate)
  base = np.asarray(prop(trans, cams.reshape(1, 1, -1), src))
  changed = cams.reshape(1, 1, -1).copy()
  changed[0, 0, outside] += 5.0
  np.testing.assert_allclose(prop(trans, changed, src), base, rtol=1e-6)
  # Without SGC the same change does reach the output.
  assert not np.allclose(prop(trans, changed, box), prop(trans, cams.reshape(1, 1, -1), box))


def test_single_superpixel_reduces_to_box_mask_baseline():
  rng = np.random.default_rng(3)
  sp = np.zeros((2, HH, WW), np.int32)
  member = _jit(sgc.membership, patch_size=P, max_superpixels=S)(sp)
  cams = rng.random((2, 2, H, W)).astype(np.float32)
  box = np.asarray(_jit(affinity.box_masks, threshold=0.4)(cams))
  u = np.asarray(_jit(sgc.target_masks, threshold=0.4)(cams, member))
  np.testing.assert_array_equal(box * u, box)
  trans = jax.jit(affinity.transition_matrix)(rng.random((2, H * W, H * W)) + 0.1)
  valid = np.ones((2, 2), bool)
  refine = _jit(affinity.refine_cams, out_size=(HH, WW))
  np.testing.assert_array_equal(
    refine(cams, trans, box * u, valid=valid), refine(cams, trans, box, valid=valid)
  )


def test_receiver_masks_are_a_one_patch_dilation():
  rng = np.random.default_rng(4)
  u = rng.random((2, 3, H * W)).astype(np.float32) * (rng.random((2, 3, H * W)) > 0.7)
  out = np.asarray(_jit(sgc.receiver_masks, grid=(H, W))(u))
  ref = ndi.maximum_filter(u.reshape(2, 3, H, W), size=(1, 1, 3, 3), mode="constant", cval=0.0)
  np.testing.assert_array_equal(out, ref.reshape(2, 3, -1))


def test_smooth_affinity_reweights_pairs_sharing_no_superpixel():
  rng = np.random.default_rng(5)
  sp = _superpixels(rng, 1, n_seeds=5)
  member = np.asarray(_jit(sgc.membership, patch_size=P, max_superpixels=S)(sp))
  trans = rng.random((1, H * W, H * W)).astype(np.float32)
  out = np.asarray(_jit(sgc.smooth_affinity, alpha=0.7)(trans, member))
  ref = trans.copy()
  for i in range(H * W):
    for j in range(H * W):
      if not np.any((member[0, i] > 0) & (member[0, j] > 0)):
        ref[0, i, j] *= 0.7
  assert np.any(ref != trans) and np.any(ref == trans)
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  np.testing.assert_array_equal(sgc.smooth_affinity(trans, member, alpha=1.0), trans)


# ------------------------------------------------------- colour-cluster target regions (§3.2)
R = 5


def _region_membership_np(cl, r=R):
  m = np.zeros((r, H * W))
  for i in range(H):
    for j in range(W):
      block = cl[i * P : (i + 1) * P, j * P : (j + 1) * P].reshape(-1)
      block = block[(block >= 0) & (block < r)]
      for v in block:
        m[v, i * W + j] += 1.0 / block.size
  return m


def _clusters(rng, b, pad_rows=0):
  """Colour clusters of Voronoi superpixels: each superpixel takes a random region 0..R-1."""
  sp = _superpixels(rng, b)
  table = rng.integers(0, R, S + 6)
  out = table[sp].astype(np.int32)
  if pad_rows:
    out[:, -pad_rows:] = -1
  return out


def test_region_membership_matches_numpy_with_padding():
  rng = np.random.default_rng(10)
  cl = _clusters(rng, 2, pad_rows=P + 3)  # Last patch row fully padded, one row partly.
  cl[1, :P, :P] = R + 2  # Out-of-range ids are not counted (like padding).
  cl[1, :P, :4] = 3
  m = np.asarray(_jit(sgc.region_membership, patch_size=P, num_regions=R)(cl))
  assert m.shape == (2, R, H * W)
  for i in range(2):
    np.testing.assert_allclose(m[i], _region_membership_np(cl[i]), atol=1e-6)
  sums = m.sum(1).reshape(2, H, W)
  np.testing.assert_allclose(sums[:, :2], 1.0, atol=1e-6)
  np.testing.assert_array_equal(sums[:, 2], 0.0)
  np.testing.assert_allclose(m[1, 3, 0], 1.0, atol=1e-6)  # Only the in-range pixels count.


def _target_regions_np(cam, m, hi, ratio_t):
  out = np.zeros(m.shape[0])
  for r in range(m.shape[0]):
    total = sum(m[r, i] * cam[i] for i in range(len(cam)))
    strong = sum(m[r, i] * cam[i] for i in range(len(cam)) if cam[i] >= hi)
    out[r] = total > 0 and strong / total >= ratio_t
  return out


def test_target_regions_and_column_mask_match_numpy():
  rng = np.random.default_rng(11)
  cl = _clusters(rng, 2, pad_rows=4)
  member = np.asarray(_jit(sgc.region_membership, patch_size=P, num_regions=R)(cl))
  cams = rng.random((2, 3, H, W)).astype(np.float32) ** 2
  cams[1, 2] = 0.0  # A padded class slot: no targets.
  fn = _jit(sgc.target_regions, high_threshold=0.4, ratio_threshold=0.5)
  t = np.asarray(fn(cams, member))
  v = np.asarray(jax.jit(sgc.column_mask)(t, member))
  vh = np.asarray(_jit(sgc.column_mask, hard=True)(t, member))
  assert t.shape == (2, 3, R) and v.shape == (2, 3, H * W)
  for i in range(2):
    for k in range(3):
      cam = cams[i, k].reshape(-1).astype(np.float64)
      ref = _target_regions_np(cam, member[i].astype(np.float64), 0.4, 0.5)
      np.testing.assert_array_equal(t[i, k], ref)
      col = ref @ member[i]
      np.testing.assert_allclose(v[i, k], col, atol=1e-6)
      np.testing.assert_array_equal(vh[i, k], col >= 0.5)
  assert not t[1, 2].any() and not v[1, 2].any()
  assert 0 < t.mean() < 1 and np.any((v > 0) & (v < 1))  # Both kinds of region, cut patches.


def test_hand_made_regions_block_background_sources():
  # Left half region 0 with a strong object, right half region 1 with weak diffuse activation.
  cl = np.zeros((1, HH, WW), np.int32)
  cl[:, :, WW // 2 :] = 1
  member = _jit(sgc.region_membership, patch_size=P, num_regions=2)(cl)
  cams = np.full((1, 1, H, W), 0.2, np.float32)
  cams[0, 0, :, : W // 2] = [[1.0, 0.9], [0.8, 0.1], [0.6, 0.5]]
  t = np.asarray(_jit(sgc.target_regions, high_threshold=0.4, ratio_threshold=0.5)(cams, member))
  # Region 0: 3.8 / 3.9 of its activation is >= 0.4 (all but the 0.1); region 1: none is.
  np.testing.assert_array_equal(t, [[[1.0, 0.0]]])
  v = np.asarray(jax.jit(sgc.column_mask)(t, member))
  np.testing.assert_array_equal(v.reshape(H, W), np.repeat([[1, 1, 0, 0]], H, 0))
  # Changing the background sources leaves the SGC propagation unchanged.
  rng = np.random.default_rng(12)
  trans = jax.jit(affinity.transition_matrix)(rng.random((1, H * W, H * W)) + 0.1)
  src = np.asarray(sgc.source_masks(np.ones_like(v), v))
  flat = cams.reshape(1, 1, -1)
  changed = flat.copy()
  changed[0, 0, v[0, 0] == 0] += 3.0
  prop = jax.jit(affinity.propagate)
  np.testing.assert_allclose(prop(trans, changed, src), prop(trans, flat, src), rtol=1e-6)
  # The same as multiplying the mask into the affinity's columns (Eq. 10).
  a_star = np.asarray(jax.jit(sgc.masked_affinity)(trans, src))
  np.testing.assert_array_equal(a_star[0, 0][:, v[0, 0] == 0], 0.0)
  np.testing.assert_allclose(
    np.einsum("bkij,bkj->bki", a_star, flat), prop(trans, flat, src), rtol=1e-5
  )


def test_one_cluster_and_zero_ratio_is_plain_propagation():
  rng = np.random.default_rng(13)
  cl = np.zeros((2, HH, WW), np.int32)
  member = _jit(sgc.region_membership, patch_size=P, num_regions=R)(cl)
  cams = rng.random((2, 2, H, W)).astype(np.float32) * 0.3  # All below the high threshold.
  t = _jit(sgc.target_regions, high_threshold=0.4, ratio_threshold=0.0)(cams, member)
  v = np.asarray(jax.jit(sgc.column_mask)(t, member))
  np.testing.assert_array_equal(v, 1.0)
  box = np.asarray(_jit(affinity.box_masks, threshold=0.4)(cams))
  np.testing.assert_array_equal(sgc.source_masks(box, v), box)
  np.testing.assert_array_equal(sgc.source_masks(box, v, replace_box=True), v)
  trans = jax.jit(affinity.transition_matrix)(rng.random((2, H * W, H * W)) + 0.1)
  valid = np.ones((2, 2), bool)
  refine = _jit(affinity.refine_cams, out_size=(HH, WW))
  np.testing.assert_array_equal(
    refine(cams, trans, sgc.source_masks(box, v), valid=valid),
    refine(cams, trans, box, valid=valid),
  )
