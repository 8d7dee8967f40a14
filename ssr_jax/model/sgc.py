"""Superpixel-guided correction (SGC, method.md §3) of the affinity propagation, [inferred].

With M [N, S] the patch-superpixel membership, SGC restricts WeCLIP's propagation
cam' = (T ⊙ r g^T) vec(cam) (affinity.propagate) to activated superpixels:
  u_c = target_masks(cam, M)          fraction of each patch inside class c's target superpixels
  g_c = m_c * u_c                      source mask: box mask ∩ superpixel mask (default)
  r_c = receiver_masks(u_c)            variant B: receivers dilated by one patch
  T   = smooth_affinity(T, M, alpha)   variant C: soft down-weighting of pairs sharing no superpixel
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
