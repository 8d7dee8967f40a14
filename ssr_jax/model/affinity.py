"""WeCLIP's CAM refinement by attention affinity (method.md §1.4), as batched pure functions.

Pipeline (per image, h x w patch grid, N = h*w):
  attention_affinity / rfm_affinity -> W [N, N]
  transition_matrix(W)              -> T (Sinkhorn x3, symmetrise, square)
  box_masks(cam)                    -> m_c (union of connected-component boxes)
  refine_cams(cam, T, m)            -> [bg; cam'] upsampled and min-max normalised
  par(image, probs)                 -> pixel-adaptive refinement
  pseudo_labels(probs, class_ids)   -> argmax label map

Every function takes an explicit leading batch axis B (they also work under `jax.vmap` over an
added outer axis). Inputs may be bfloat16; all arithmetic here is float32, and the small
matmuls use HIGHEST precision so that GPUs do not silently fall back to TF32.
Classes are padded to a static count K (Kmax) with a validity mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssr_jax import resize as resize_lib

_HI = lax.Precision.HIGHEST
_F32 = jnp.float32

# 3x3 neighbour offsets (dy, dx) in the order of AFA's PAR kernel (row-major, centre skipped).
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# Unchecked propagation steps before box_masks' convergence loop (see there).
_BOX_STEPS = 24


def attention_affinity(attn, *, num_layers: int):
  """Pre-RFM affinity (§1.4.1): mean of the last num_layers attention maps, CLS dropped.

  attn: [L, B, T, T] head-averaged attention of every block (T = 1 + N, CLS first).
  Returns W [B, N, N] float32.
  """
  if not 1 <= num_layers <= attn.shape[0]:
    raise ValueError(f"attention_affinity: num_layers={num_layers} not in [1, {attn.shape[0]}]")
  a = attn[-num_layers:, :, 1:, 1:].astype(_F32)
  return jnp.mean(a, axis=0)


def fuse_affinities(w_clip, w_dino, *, dino_weight: float):
  """SGC's fused affinity (§3.1, Eq. 9): (1 - dino_weight) * W_clip + dino_weight * W_dino,
  each row-normalised first (CLIP's and DINO's patch-to-patch attention, or RFM's affinity, live
  on different scales). The paper's CLIP : DINO = 0.4 : 0.6 is dino_weight = 0.6.

  w_clip, w_dino: [B, N, N] non-negative. Returns [B, N, N] float32 (rows sum to 1).
  """

  def rows(w):
    w = w.astype(_F32)
    return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-12)

  return (1.0 - dino_weight) * rows(w_clip) + dino_weight * rows(w_dino)


def feature_affinity(feats):
  """Decoder affinity S = sigmoid(F F^T) (§1.5, WeCLIP's attn_pred), differentiable.

  feats: [B, N, Dd] fused decoder features. Returns [B, N, N] float32.
  """
  f = feats.astype(_F32)
  return jax.nn.sigmoid(jnp.einsum("bnd,bmd->bnm", f, f, precision=_HI))


def rfm_affinity(attn, feats, *, num_layers: int):
  """RFM affinity (§1.4.2): layer-selected attention times the decoder affinity.

  attn: [L, B, T, T] as in attention_affinity; feats: [B, N, Dd] decoder features F (gradient
  stopped: the affinity only builds pseudo labels). S = sigmoid(F F^T); over the last num_layers
  maps A_l (CLS dropped), d_l = sum_ij (S - A_l); layers with d_l <= mean_l d_l are averaged (as
  WeCLIP: sum(kept) / (#kept + 1e-5)) and multiplied elementwise by S.
  Returns W [B, N, N] float32.
  """
  if not 1 <= num_layers <= attn.shape[0]:
    raise ValueError(f"rfm_affinity: num_layers={num_layers} not in [1, {attn.shape[0]}]")
  s = lax.stop_gradient(feature_affinity(feats))  # [B, N, N]
  a = lax.stop_gradient(attn[-num_layers:, :, 1:, 1:].astype(_F32))  # [L, B, N, N]
  d = jnp.sum(s[None] - a, axis=(-2, -1))  # [L, B]
  keep = (d <= jnp.mean(d, axis=0, keepdims=True)).astype(_F32)  # [L, B]
  mean_kept = jnp.einsum("lb,lbnm->bnm", keep, a, precision=_HI) / (
    jnp.sum(keep, axis=0)[:, None, None] + 1e-5
  )
  return mean_kept * s


def transition_matrix(w, *, iters: int = 3, square: bool = True):
  """WeCLIP's compute_trans_mat (§1.4.3).

  w: [B, N, N] positive affinity. `iters` times: divide by column sums, then by row sums;
  symmetrise (T + T^T)/2; then square once (T @ T) unless square=False, which returns the
  symmetrised matrix that would be squared. Returns [B, N, N] float32.
  """
  t = w.astype(_F32)
  for _ in range(iters):
    t = t / jnp.sum(t, axis=-2, keepdims=True)
    t = t / jnp.sum(t, axis=-1, keepdims=True)
  t = 0.5 * (t + jnp.swapaxes(t, -1, -2))
  if square:
    t = jnp.matmul(t, t, precision=_HI)
  return t


def _threshold_table(threshold: float) -> np.ndarray:
  """int(threshold * q) for every uint8 maximum q, computed exactly as the reference does.

  WeCLIP (CLIP-ES scoremap2bbox) thresholds at `int(threshold * np.max(uint8_map))`: a float64
  product truncated to int. Tabulating it on the host reproduces the float64 rounding exactly.
  """
  return np.array([int(threshold * np.uint8(q)) for q in range(256)], np.int32)


def _neighbour_max(x, neutral):
  """Max over the 3x3 neighbourhood (incl. centre) of the last two axes; outside = neutral."""
  h, w = x.shape[-2:]
  pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
  xp = jnp.pad(x, pad, constant_values=neutral)
  out = x
  for dy, dx in _OFFSETS:
    out = jnp.maximum(out, xp[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w])
  return out


def box_masks(cams, *, threshold: float):
  """Per-class box masks (§1.4.4), on device.

  cams: [B, K, h, w] GradCAM maps in [0, 1]. As WeCLIP: q = uint8(cam * 255) (truncation), the
  foreground is q > int(threshold * max q) (cv2.THRESH_BINARY is strict), and each contour's
  bounding rectangle [x, min(x + w, W - 1)) x [y, min(y + h, H - 1)) is filled, i.e. the last
  row/column of the grid is dropped (reference quirk). Contours (RETR_TREE) are replaced by the
  8-connected components of the foreground: nested contours' boxes lie inside their parent's.
  An empty foreground (e.g. an all-zero map) gives an all-zero mask.

  Components are found by propagating each foreground pixel's running bounding box
  (ymax, xmax, -ymin, -xmin) to its 8 neighbours until nothing changes (at most N steps), so
  every pixel ends with its component's box.
  Returns [B, K, N] float32 in {0, 1}.
  """
  cams = lax.stop_gradient(cams).astype(_F32)
  h, w = cams.shape[-2:]
  q = jnp.clip(jnp.floor(cams * 255.0), 0, 255).astype(jnp.int32)
  qmax = jnp.max(q, axis=(-2, -1), keepdims=True)
  thr = jnp.asarray(_threshold_table(threshold))[qmax]
  fg = q > thr  # [B, K, h, w]

  neutral = -(2**20)
  rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32)[:, None], (h, w))
  cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32)[None, :], (h, w))
  coords = jnp.stack([rows, cols, -rows, -cols], axis=-3)  # [4, h, w], all maximised.
  fg4 = fg[..., None, :, :]
  state0 = jnp.where(fg4, coords, neutral)  # [B, K, 4, h, w]

  def steps(state, n):
    for _ in range(n):
      state = jnp.where(fg4, _neighbour_max(state, neutral), neutral)
    return state

  # Each convergence check of a GPU while loop is a device-to-host round trip (~18 of them per
  # VOC step, over 1 ms, when checked every 2 steps). Components of CAM blobs on a ViT grid
  # converge within _BOX_STEPS steps, so those run unchecked and the loop usually stops after
  # its first check; longer (snake-like) components still converge, 4 steps per check.
  prev = steps(state0, _BOX_STEPS - 1)
  state = steps(prev, 1)

  def body(carry):
    state, _ = carry
    new = steps(state, 4)
    return new, jnp.any(new != state)

  state, _ = lax.while_loop(lambda c: c[1], body, (state, jnp.any(state != prev)))

  y0, x0 = -state[..., 2, :, :], -state[..., 3, :, :]
  y1 = jnp.minimum(state[..., 0, :, :] + 1, h - 1)  # Exclusive end clipped to H - 1 (quirk).
  x1 = jnp.minimum(state[..., 1, :, :] + 1, w - 1)
  flat = lambda a: a.reshape(a.shape[:-2] + (h * w,))
  y0, x0, y1, x1, fgf = flat(y0), flat(x0), flat(y1), flat(x1), flat(fg)
  r = jnp.arange(h)
  c = jnp.arange(w)
  in_rows = fgf[..., None] & (y0[..., None] <= r) & (r < y1[..., None])  # [B, K, N, h]
  in_cols = fgf[..., None] & (x0[..., None] <= c) & (c < x1[..., None])  # [B, K, N, w]
  mask = jnp.any(in_rows[..., :, :, None] & in_cols[..., :, None, :], axis=-3)  # [B, K, h, w]
  return flat(mask).astype(_F32)


def propagate(trans, cams, src_mask, *, recv_mask=None):
  """Masked affinity propagation (§1.4.5, §3.4): cam' = (T ⊙ r g^T) vec(cam).

  trans: [B, N, N] transition matrix; cams: [B, K, N]; src_mask g: [B, K, N] masks the columns
  (source patches); recv_mask r: [B, K, N] or None (= all ones) masks the rows (receivers).
  Returns [B, K, N] float32.
  """
  t = trans.astype(_F32)
  src = cams.astype(_F32) * src_mask.astype(_F32)
  out = jnp.einsum("bij,bkj->bki", t, src, precision=_HI)
  if recv_mask is not None:
    out = out * recv_mask.astype(_F32)
  return out


def refine_cams(cams, trans, src_masks, *, out_size, valid, bg_power: float = 1.0, recv_masks=None):
  """Propagated, upsampled and normalised CAMs with background first (§1.4.5-7).

  cams: [B, K, h, w] GradCAM maps; trans: [B, N, N]; src_masks (and recv_masks): [B, K, N]
  (see propagate); valid: [B, K] bool, False for padded class slots; out_size: (H, W).
  As WeCLIP's scale_cam_image: each propagated map is min-max normalised at patch resolution,
  (c - min) / (max(c - min) + 1e-7), *then* resized bilinearly (align_corners=False, as
  cv2.resize). Invalid classes are zeroed; bg = max(1 - max_k cam_k, 0) ** bg_power.
  Returns [B, 1 + K, H, W] float32.
  """
  b, k, h, w = cams.shape
  cam = propagate(trans, cams.reshape(b, k, h * w), src_masks, recv_mask=recv_masks)
  cam = cam - jnp.min(cam, axis=-1, keepdims=True)
  cam = cam / (jnp.max(cam, axis=-1, keepdims=True) + 1e-7)
  cam = cam.reshape(b, k, h, w)
  with jax.default_matmul_precision("highest"):
    cam = resize_lib.resize(cam, out_size, "bilinear", axes=(-2, -1))
  cam = jnp.where(valid[:, :, None, None], cam, 0.0)
  return jnp.concatenate([background(cam, bg_power, axis=1), cam], axis=1)


def background(cams, power: float, *, axis: int = 1):
  """Background score max(1 - max_k cam_k, 0) ** power (WeCLIP's cam_bg_thres), §1.4.7.

  cams: float maps in [0, 1] with the classes on `axis` (e.g. [B, K, H, W], axis=1). Returns the
  same shape with that axis of size 1.
  """
  # Clamp: rounding can push the max a hair above 1, and a fractional power of a negative is NaN.
  return jnp.maximum(1.0 - jnp.max(cams, axis=axis, keepdims=True), 0.0) ** power


def _neighbours(x, dilations, axes=(1, 2)):
  """8 * len(dilations) replicate-padded dilated neighbours of x along the two spatial `axes`,
  PAR order.

  One edge pad by the largest dilation serves every dilation: slicing it at offset pad + dy*d
  reads x at clamp(i + dy*d), exactly what a pad by d would give. Per-dilation pads would each
  be materialised (one copy of x per dilation and PAR iteration on GPU).
  """
  ah, aw = axes
  hh, ww = x.shape[ah], x.shape[aw]
  r = max(dilations)
  pad = [(0, 0)] * x.ndim
  pad[ah] = pad[aw] = (r, r)
  xp = jnp.pad(x, pad, mode="edge")
  out = []
  for d in dilations:
    for dy, dx in _OFFSETS:
      y0, x0 = r + dy * d, r + dx * d
      out.append(lax.slice_in_dim(lax.slice_in_dim(xp, y0, y0 + hh, axis=ah), x0, x0 + ww, axis=aw))
  return out


def _pos_weights(dilations, w_pos: float, temp: float) -> np.ndarray:
  """w_pos * softmax of PAR's positional term over the neighbours (constant per pixel)."""
  diag = np.sqrt(np.float32(2))
  pos = np.array(
    [d * (diag if dy != 0 and dx != 0 else 1.0) for d in dilations for dy, dx in _OFFSETS],
    np.float32,
  )
  std = np.std(pos, ddof=1)  # torch.std is unbiased.
  aff = -((pos / (std + 1e-8) / temp) ** 2)
  e = np.exp(aff - aff.max())
  return (w_pos * e / e.sum()).astype(np.float32)


def par(
  image,
  probs,
  *,
  dilations=(1, 2, 4, 8, 12, 24),
  iters: int = 20,
  w_pos: float = 0.01,
  temp: float = 0.3,
):
  """Pixel-adaptive refinement (AFA's PAR, §1.4.8).

  image: [B, H, W, 3] the normalised image, already at the probs' size (WeCLIP resizes it with
  align_corners=True inside PAR; at train time the sizes match, so it is a no-op there);
  probs: [B, H, W, C]. Neighbours: 8 per dilation, replicate padding, centre excluded.
  Affinity, as AFA's code: per channel, -(|I_j - I_i| / (std_j I + 1e-8) / temp)^2 with the
  unbiased std over the neighbours only (not the centre), averaged over RGB, softmax over the
  neighbours, plus w_pos times a softmax of the same form on the neighbour distances (d or
  d*sqrt2). The weights therefore sum to 1 + w_pos, as in the reference. Each of the iters
  iterations sets probs <- sum_j aff_j * probs_j. Returns [B, H, W, C] float32.
  """
  # Affinities are [B, M, H, W] planes and probs iterate as [B, H, C, W], so the C channel rows
  # of an image row, which share that row's affinities, are processed close together. PAR alone
  # at VOC train shapes on an H100: 4.13 ms this way, 4.30 channels-first, 5.94 channels-last.
  img = jnp.moveaxis(image.astype(_F32), -1, 1)  # [B, 3, H, W]
  # Sums over the M neighbour views rather than a stacked [B, M, 3, H, W] tensor, which XLA
  # materialised (0.47 ms of the step on an H100); two passes, as jnp.std.
  n_img = _neighbours(img, dilations, axes=(2, 3))  # M x [B, 3, H, W]
  mean = sum(n_img) / len(n_img)
  std = jnp.sqrt(sum((n - mean) ** 2 for n in n_img) / (len(n_img) - 1))
  scale = 1.0 / ((std + 1e-8) * temp)
  d2 = [((n - img) * scale) ** 2 for n in n_img]
  logits = [-(d[:, 0] + d[:, 1] + d[:, 2]) / 3 for d in d2]  # RGB mean, elementwise on GPU.
  aff = jax.nn.softmax(jnp.stack(logits, axis=1), axis=1)  # [B, M, H, W]
  aff = aff + jnp.asarray(_pos_weights(dilations, w_pos, temp))[:, None, None]

  def body(_, p):  # p: [B, H, C, W]
    out = jnp.zeros_like(p)
    for j, nb in enumerate(_neighbours(p, dilations, axes=(1, 3))):
      out = out + aff[:, j, :, None, :] * nb
    return out

  # Unrolled on GPU, where each while-loop iteration costs a device-to-host round trip (0.8 ms of
  # 3.1 at VOC size on an H100); a loop elsewhere: XLA:CPU ran the unrolled chain 2x slower.
  unroll = jax.default_backend() == "gpu"
  p = lax.fori_loop(0, iters, body, jnp.swapaxes(probs.astype(_F32), 2, 3), unroll=unroll)
  return jnp.swapaxes(p, 2, 3)


def pseudo_labels(probs, class_ids, valid=None):
  """Argmax pseudo labels (§1.4.9): bg -> 0, foreground class c -> c + 1; no ignore region.

  probs: [B, H, W, 1 + K] (bg first); class_ids: [B, K] int class index of each slot; valid:
  [B, K] bool, or None to take class_ids >= 0 (padding = -1). Invalid slots never win; ties go
  to the lowest slot (as torch.argmax). Returns [B, H, W] int32.
  """
  class_ids = class_ids.astype(jnp.int32)
  if valid is None:
    valid = class_ids >= 0
  valid = jnp.concatenate([jnp.ones_like(class_ids[:, :1], bool), valid.astype(bool)], axis=1)
  scores = jnp.where(valid[:, None, None, :], probs.astype(_F32), -jnp.inf)
  # argmax as max + lowest matching slot: two plain reductions that fuse, where jnp.argmax's
  # (value, index) reduction took 0.22 ms on an H100 for a VOC batch. A NaN score gives bg.
  slot = jnp.arange(scores.shape[-1], dtype=jnp.int32)
  best = jnp.max(scores, axis=-1, keepdims=True)
  idx = jnp.min(jnp.where(scores == best, slot, scores.shape[-1]), axis=-1)  # [B, H, W]
  keys = jnp.concatenate([jnp.zeros_like(class_ids[:, :1]), class_ids + 1], axis=1)  # [B, 1+K]
  return jnp.sum(jnp.where(idx[..., None] == slot, keys[:, None, None, :], 0), axis=-1)
