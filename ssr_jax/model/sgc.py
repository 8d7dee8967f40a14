"""Superpixel-guided correction (SGC, method.md §3) of the affinity propagation, [inferred].

With M [N, S] the patch-superpixel membership, SGC restricts WeCLIP's propagation
cam' = (T ⊙ r g^T) vec(cam) (affinity.propagate) to activated superpixels:
  u_c = target_masks(cam, M)          fraction of each patch inside class c's target superpixels
  g_c = m_c * u_c                      source mask: box mask ∩ superpixel mask (default)
  r_c = receiver_masks(u_c)            variant B: receivers dilated by one patch
  T   = smooth_affinity(T, M, alpha)   variant C: soft down-weighting of pairs sharing no superpixel
The paper's own form (§3.2-3.3, Eqs. 7-11) uses colour-cluster target regions instead of
single superpixels, with R regions = the per-image K-means clusters of the superpixels
(data.color_clusters, precomputed with them; batch key "clusters"):
  P   = region_membership(clusters)     [B, R, N] fraction of each patch's pixels in region r
  t_c = target_regions(cam, P)          ratio of high-confidence to total activation per region
  v_c = column_mask(t_c, P)             [B, K, N] patches (columns = sources) in target regions
  g_c = source_masks(m_c, v_c)          box mask ∩ v_c (default) or v_c alone
so that propagate(T, cam, g) = (T ⊙ 1 g_c^T) vec(cam_c): Mask_ij = g_c[j] zeroes column j
(source patch j) for every receiver i, as masked_affinity spells out.
All functions take an explicit batch axis B; arithmetic is float32 with HIGHEST-precision
matmuls (inputs may be bfloat16).
"""

import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST
_F32 = jnp.float32


def membership(superpixels, *, patch_size: int, max_superpixels: int):
  """Patch-superpixel membership M (§3.2).

  superpixels: [B, H, W] int32 superpixel ids, negative (-1) for padding; H and W multiples of
  patch_size. Ids >= max_superpixels are folded modulo max_superpixels: SLIC numbers its segments
  roughly in raster order, so ids that collide are far apart in the image (clipping would instead
  merge all high ids into one large region). M[b, i, s] is the fraction of patch i's valid
  (non-padding) pixels that lie in superpixel s, so rows sum to 1, and a fully padded patch has a
  zero row. Patches are numbered row-major on the (H/p) x (W/p) grid, as the ViT tokens.
  Returns [B, N, S] float32 with S = max_superpixels.
  """
  b, hh, ww = superpixels.shape
  p, s = patch_size, max_superpixels
  if hh % p or ww % p:
    raise ValueError(
      f"sgc.membership: superpixel map {hh}x{ww} is not a multiple of patch_size={p}; "
      "crop or pad the superpixels like the image"
    )
  h, w = hh // p, ww // p
  sp = superpixels.astype(jnp.int32)
  valid = sp >= 0
  ids = jnp.where(valid, sp % s, 0)
  patch = (jnp.arange(hh)[:, None] // p) * w + jnp.arange(ww)[None, :] // p  # [H, W]
  flat = (jnp.arange(b)[:, None, None] * (h * w) + patch[None]) * s + ids
  counts = (
    jnp.zeros((b * h * w * s,), jnp.int32)
    .at[flat.reshape(-1)]
    .add(valid.reshape(-1).astype(jnp.int32))
  )
  counts = counts.reshape(b, h * w, s).astype(_F32)
  return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def target_masks(cams, member, *, threshold: float, hard: bool = False):
  """Superpixel target masks u_c (§3.3).

  cams: [B, K, h, w] (or [B, K, N]) GradCAM maps; member: [B, N, S] from membership.
  Superpixel-pooled CAM c_s = (M^T cam)_s / (M^T 1)_s (the pixel mean of the patch-constant CAM
  over superpixel s); target superpixels O_c = {s non-empty : c_s >= threshold * max_s c_s};
  u_c = M 1[O_c], the fraction of each patch covered by target superpixels. hard=True binarises
  u at 0.5 (u >= 0.5: the patch's majority, ties included). An all-zero CAM selects every
  superpixel (it cannot discriminate). Returns [B, K, N] float32.
  """
  b, k = cams.shape[:2]
  cam = lax.stop_gradient(cams).astype(_F32).reshape(b, k, -1)
  m = lax.stop_gradient(member).astype(_F32)
  if cam.shape[-1] != m.shape[1]:
    raise ValueError(f"sgc.target_masks: cams have {cam.shape[-1]} patches, member {m.shape[1]}")
  area = jnp.sum(m, axis=1)  # [B, S]
  nonempty = (area > 0)[:, None, :]  # [B, 1, S]
  pooled = jnp.einsum("bns,bkn->bks", m, cam, precision=_HI) / jnp.maximum(area, 1e-12)[:, None]
  pooled = jnp.where(nonempty, pooled, -jnp.inf)
  top = jnp.max(pooled, axis=-1, keepdims=True)
  target = (nonempty & (pooled >= threshold * top)).astype(_F32)  # [B, K, S]
  u = jnp.einsum("bns,bks->bkn", m, target, precision=_HI)
  if hard:
    u = (u >= 0.5).astype(_F32)
  return u


def receiver_masks(u, *, grid):
  """Variant B receiver mask (§3.4): u dilated by one patch (3x3 max, zero outside the grid).

  u: [B, K, N] patch masks; grid: (h, w) with h * w = N. Returns [B, K, N] float32.
  """
  h, w = grid
  b, k, n = u.shape
  if h * w != n:
    raise ValueError(f"sgc.receiver_masks: grid {h}x{w} does not match N={n}")
  x = u.astype(_F32).reshape(b, k, h, w)
  xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  out = x
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      out = jnp.maximum(out, xp[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w])
  return out.reshape(b, k, n)


def smooth_affinity(trans, member, *, alpha: float):
  """Variant C (§3.4): T ⊙ (alpha + (1 - alpha) [M M^T > 0]), a soft, never hard, reweighting.

  trans: [B, N, N] (the final, squared transition matrix); member: [B, N, S].
  Pairs of patches that share no superpixel are scaled by alpha; alpha = 1 is the identity.
  Returns [B, N, N] float32.
  """
  m = member.astype(_F32)
  share = jnp.einsum("bns,bms->bnm", m, m, precision=_HI) > 0
  return trans.astype(_F32) * (alpha + (1.0 - alpha) * share.astype(_F32))


# ------------------------------------------------------------- colour-cluster target regions


def region_membership(clusters, *, patch_size: int, num_regions: int):
  """Patch-region membership P (§3.2): P[b, r, i] = fraction of patch i's pixels in region r.

  clusters: [B, H, W] int region ids 0..R-1 (the colour clusters), negative (-1) on padding; H
  and W multiples of patch_size. Padding, and ids >= num_regions (set num_regions to
  data.color_clusters, so none exist), are not counted: columns over regions sum to 1 for a
  patch with any valid pixel, 0 for a fully padded one. Patches row-major on the (H/p) x (W/p)
  grid, as the ViT tokens. Returns [B, R, N] float32 with R = num_regions.
  """
  b, hh, ww = clusters.shape
  p, r = patch_size, num_regions
  if hh % p or ww % p:
    raise ValueError(
      f"sgc.region_membership: cluster map {hh}x{ww} is not a multiple of patch_size={p}; "
      "crop or pad the clusters like the image"
    )
  h, w = hh // p, ww // p
  hot = (clusters.astype(jnp.int32)[..., None] == jnp.arange(r)).astype(_F32)  # [B, H, W, R]
  counts = hot.reshape(b, h, p, w, p, r).sum(axis=(2, 4)).reshape(b, h * w, r)
  frac = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
  return jnp.swapaxes(frac, 1, 2)


def target_regions(cams, member, *, high_threshold: float, ratio_threshold: float):
  """Target regions (§3.2, Eq. 8) per image and class.

  cams: [B, K, h, w] (or [B, K, N]) GradCAM maps (max-normalised, so high_threshold is on the
  box threshold's scale, §1.4.4); member: [B, R, N] from region_membership. At patch level, with
  the membership fractions as weights:
    ratio[b, k, r] = sum_i P[r, i] cam_k(i) 1[cam_k(i) >= high_threshold] / sum_i P[r, i] cam_k(i)
  and region r is a target of class k when its activation is positive and ratio >=
  ratio_threshold (>=, so ratio_threshold = 0 takes every activated region: SGC off). A region
  with zero activation (absent from the crop, or a zero CAM such as a padded class) is never a
  target. Returns [B, K, R] float32 in {0, 1}.
  """
  b, k = cams.shape[:2]
  cam = lax.stop_gradient(cams).astype(_F32).reshape(b, k, -1)
  m = lax.stop_gradient(member).astype(_F32)
  if cam.shape[-1] != m.shape[-1]:
    raise ValueError(f"sgc.target_regions: cams have {cam.shape[-1]} patches, member {m.shape[-1]}")
  high = jnp.where(cam >= high_threshold, cam, 0.0)
  total = jnp.einsum("brn,bkn->bkr", m, cam, precision=_HI)
  strong = jnp.einsum("brn,bkn->bkr", m, high, precision=_HI)
  ratio = strong / jnp.where(total > 0, total, 1.0)
  return ((total > 0) & (ratio >= ratio_threshold)).astype(_F32)


def column_mask(targets, member, *, hard: bool = False):
  """Per-class column (source patch) mask of Eqs. 10-11: how much of each patch lies in the
  class's target regions.

  targets: [B, K, R] from target_regions; member: [B, R, N]. v[b, k, i] = sum_r P[r, i] t_k(r),
  the fraction of patch i's pixels in target regions (a soft mask where a region boundary cuts
  a patch); hard=True binarises at v >= 0.5 (the patch's majority, ties included, as
  target_masks). Fully padded patches get 0. Returns [B, K, N] float32.
  """
  v = jnp.einsum("bkr,brn->bkn", targets.astype(_F32), member.astype(_F32), precision=_HI)
  if hard:
    v = (v >= 0.5).astype(_F32)
  return v


def source_masks(box, column, *, replace_box: bool = False):
  """SGC's source masks g_c for affinity.propagate / refine_cams (§3.3): the box mask m_c
  intersected with the column mask (default, §6 #12), or the column mask alone (replace_box).

  box, column: [B, K, N]. Returns [B, K, N] float32.
  """
  column = column.astype(_F32)
  return column if replace_box else box.astype(_F32) * column


def masked_affinity(trans, mask):
  """A* = A ⊙ Mask of Eq. 10 per class: Mask[k, i, j] = mask[k, j] scales column j (source
  patch j) for every row i (receiver), so A*_k @ vec(cam_k) = affinity.propagate(trans, cam,
  mask). Materialises [B, K, N, N]: for inspection and tests; the pipeline passes `mask` as
  propagate's src_mask instead.

  trans: [B, N, N]; mask: [B, K, N]. Returns [B, K, N, N] float32.
  """
  return trans.astype(_F32)[:, None, :, :] * mask.astype(_F32)[:, :, None, :]
