"""WeCLIP's training losses (method.md §1.6): bg/fg-balanced CE and the affinity loss.

All functions take an explicit batch axis B and reduce over the whole batch, as the reference
(torch's batch-wide means); arithmetic is float32 (logits may be bfloat16).
"""

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax import resize as resize_lib

_F32 = jnp.float32


def balanced_ce(logits, labels, *, ignore: int = 255):
  """L_seg = 0.5 CE(bg pixels) + 0.5 CE(fg pixels) (§1.6).

  logits: [B, H, W, C]; labels: [B, H, W] int (0 = bg, `ignore` skipped; values outside [0, C)
  are skipped too, where torch would raise). Each CE is a mean over its own pixel set in the
  whole batch; an empty set contributes 0 (torch would give NaN). Returns a float32 scalar.
  """
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(_F32), axis=-1)
  safe = jnp.clip(labels, 0, num_classes - 1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  known = (labels != ignore) & (labels >= 0) & (labels < num_classes)
  bg = known & (labels == 0)
  fg = known & (labels != 0)

  def mean_over(mask):
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1).astype(_F32)

  return 0.5 * mean_over(bg) + 0.5 * mean_over(fg)


def downsample_labels(labels, size):
  """Nearest downsampling of label maps as torch's legacy F.interpolate(mode="nearest").

  labels: [B, H, W] int; size: (h, w). Source index floor(dst * in / out), the same indices
  as ssr_jax.resize.interp_matrix(..., "nearest"). Returns [B, h, w] with the input dtype.
  """
  hh, ww = labels.shape[-2:]
  rows = np.argmax(resize_lib.interp_matrix(hh, int(size[0]), "nearest"), axis=1)
  cols = np.argmax(resize_lib.interp_matrix(ww, int(size[1]), "nearest"), axis=1)
  return labels[..., rows, :][..., cols]


def _window(h: int, w: int, radius: int) -> np.ndarray:
  """[N, N] bool: |row_i - row_j| <= radius and |col_i - col_j| <= radius (get_mask_by_radius)."""
  r = np.repeat(np.arange(h), w)
  c = np.tile(np.arange(w), h)
  return (np.abs(r[:, None] - r[None]) <= radius) & (np.abs(c[:, None] - c[None]) <= radius)


def affinity_targets(labels, *, radius: int = 8, ignore: int = 255):
  """Affinity labels (§1.6, WeCLIP's cams_to_affinity_label).

  labels: [B, h, w] int patch-level pseudo labels (see downsample_labels). Target a_ij = 1 if
  the labels of patches i and j are equal, else 0; `ignore` outside the window
  |Δrow|, |Δcol| <= radius and where either label is `ignore`. Returns [B, N, N] int32.
  """
  b, h, w = labels.shape
  lab = labels.reshape(b, h * w).astype(jnp.int32)
  eq = (lab[:, :, None] == lab[:, None, :]).astype(jnp.int32)
  bad = (lab == ignore)[:, :, None] | (lab == ignore)[:, None, :]
  bad = bad | ~jnp.asarray(_window(h, w, radius))[None]
  return jnp.where(bad, ignore, eq)


def affinity_loss(attn_pred, labels_small, *, radius: int = 8, ignore: int = 255):
  """L_aff = 0.5 sum_pos (1 - a) / (#pos + 1) + 0.5 sum_neg a / (#neg + 1) (§1.6).

  attn_pred: [B, N, N] predicted affinities in (0, 1) (sigmoid(F F^T)); labels_small:
  [B, h, w] patch-level pseudo labels. Sums and counts run over the whole batch.
  Returns a float32 scalar.
  """
  t = affinity_targets(labels_small, radius=radius, ignore=ignore)
  a = attn_pred.astype(_F32)
  pos = t == 1
  neg = t == 0
  pos_loss = jnp.sum(jnp.where(pos, 1.0 - a, 0.0)) / (jnp.sum(pos) + 1).astype(_F32)
  neg_loss = jnp.sum(jnp.where(neg, a, 0.0)) / (jnp.sum(neg) + 1).astype(_F32)
  return 0.5 * pos_loss + 0.5 * neg_loss
