"""Cross-modal prototype alignment (CMPA, method.md §2), [inferred] design.

Image prototypes are masked averages of the (projected) decoder features per image and class,
pooled with the online pseudo labels (or soft CAM weights); an InfoNCE pulls each valid
prototype towards its class's frozen CLIP text embedding and away from every other class's.

Class indexing follows the pseudo labels: 0 = background, c + 1 = foreground class c.
Text prototypes are [num_bg + C, D]: the first num_bg rows are background entries (1 row, the
mean of the bg-name embeddings, in "mean" mode; all K bg names in "best" mode, where a bg
prototype's positive is its best-matching bg name), followed by the C foreground classes.
All functions take an explicit batch axis B and compute in float32 (HIGHEST-precision matmuls).
"""

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST
_F32 = jnp.float32


def l2_normalize(x, axis: int = -1):
  """x / ||x|| along axis, with zero vectors mapped to zero and finite gradients there."""
  x = x.astype(_F32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-24))


def soft_prototypes(feats, weights, *, min_weight: float):
  """Weighted masked average pooling (§2.2 soft variant).

  feats: [B, N, D] patch features; weights: [B, C+1, N] non-negative class weights (gradient
  stopped), class 0 = background. p = sum_i w_i z_i / (sum_i w_i + 1e-6), L2-normalised (zero
  where the weights are all zero). A prototype is valid when its total weight >= min_weight.
  Returns (protos [B, C+1, D] float32, valid [B, C+1] bool).
  """
  w = lax.stop_gradient(weights).astype(_F32)
  mass = jnp.sum(w, axis=-1)
  sums = jnp.einsum("bcn,bnd->bcd", w, feats.astype(_F32), precision=_HI)
  protos = l2_normalize(sums / (mass[..., None] + 1e-6))
  return protos, mass >= min_weight


def prototypes(feats, labels, *, num_classes: int, min_pixels: int, ignore: int = 255):
  """Hard masked average pooling with pseudo labels (§2.2, default).

  feats: [B, N, D] patch features (the projected, per-patch normalised Z); labels: [B, N] int
  pseudo labels on the patch grid (0 = bg, c + 1 = fg class c, `ignore` or any value outside
  [0, num_classes) pools nowhere); num_classes = C + 1 including background.
  A class is valid in an image when it covers at least min_pixels patches.
  Returns (protos [B, C+1, D] float32, L2-normalised, zero where empty; valid [B, C+1] bool).
  """
  labels = labels.astype(jnp.int32)
  onehot = (labels[:, None, :] == jnp.arange(num_classes)[None, :, None]) & (
    labels[:, None, :] != ignore
  )
  return soft_prototypes(feats, onehot.astype(_F32), min_weight=min_pixels)


def text_prototypes(text_fg, text_bg, *, bg_mode: str = "mean"):
  """Frozen text prototypes (§2.3): background row(s) first, then the C foreground classes.

  text_fg: [C, D]; text_bg: [K, D] CLIP text embeddings. bg_mode "mean": one bg row, the
  re-normalised mean of the (normalised) bg-name embeddings -> [1 + C, D]. bg_mode "best": all
  K bg names kept as separate rows -> [K + C, D] (pass num_bg=K to the losses). float32.
  """
  fg = l2_normalize(text_fg)
  bg = l2_normalize(text_bg)
  if bg_mode == "mean":
    bg = l2_normalize(jnp.mean(bg, axis=0, keepdims=True))
  elif bg_mode != "best":
    raise ValueError(f"cmpa.text_prototypes: bg_mode={bg_mode!r}; use 'mean' or 'best'")
  return jnp.concatenate([bg, fg], axis=0)


def _info_nce(x, cls, text, *, temperature: float, num_bg: int):
  """Per-row InfoNCE against all text prototypes; cls in [0, C] (0 = bg). x: [..., D]."""
  logits = jnp.einsum("...d,td->...t", x, text.astype(_F32), precision=_HI) / temperature
  lse = jax.nn.logsumexp(logits, axis=-1)
  # Positive: the class's own text row; for bg, the best-matching bg row (the only one in
  # "mean" mode).
  bg_pos = jnp.max(logits[..., :num_bg], axis=-1)
  fg_idx = jnp.clip(num_bg + cls - 1, num_bg, text.shape[0] - 1)
  fg_pos = jnp.take_along_axis(logits, fg_idx[..., None], axis=-1)[..., 0]
  return lse - jnp.where(cls == 0, bg_pos, fg_pos)


def cmpa_loss(protos, valid, text, *, temperature: float, num_bg: int = 1):
  """Prototype-to-text InfoNCE (§2.4): mean over valid (image, class) prototypes.

  protos: [B, C+1, D] (class 0 = bg); valid: [B, C+1] bool; text: [num_bg + C, D] from
  text_prototypes. loss_{b,c} = -log softmax_t(<p_{b,c}, t> / temperature)[pos(c)] over all
  num_bg + C text rows. Invalid prototypes do not enter the loss (zero gradient); with none
  valid the loss is 0. Returns a float32 scalar.
  """
  c1 = protos.shape[1]
  if text.shape[0] != num_bg + c1 - 1:
    raise ValueError(
      f"cmpa.cmpa_loss: text has {text.shape[0]} rows but num_bg={num_bg} + C={c1 - 1} "
      "expected; build it with text_prototypes and pass num_bg=K for bg_mode='best'"
    )
  cls = jnp.broadcast_to(jnp.arange(c1), protos.shape[:2])
  per = _info_nce(protos.astype(_F32), cls, text, temperature=temperature, num_bg=num_bg)
  valid = valid.astype(bool)
  total = jnp.sum(jnp.where(valid, per, 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1).astype(_F32)


def pixel_prototype_loss(
  z, labels, text, *, temperature: float, num_bg: int = 1, ignore: int = 255
):
  """Dense pixel-to-text InfoNCE (§2.5, optional L_pcl).

  z: [B, N, D] patch features (re-normalised here; idempotent for the head's unit vectors);
  labels: [B, N] int (0 = bg, c + 1 = fg c; `ignore` or out-of-range values are skipped);
  text: [num_bg + C, D]. Mean over labelled patches, 0 when there are none. float32 scalar.
  """
  num_fg = text.shape[0] - num_bg
  labels = labels.astype(jnp.int32)
  keep = (labels != ignore) & (labels >= 0) & (labels <= num_fg)
  cls = jnp.where(keep, labels, 0)
  per = _info_nce(l2_normalize(z), cls, text, temperature=temperature, num_bg=num_bg)
  total = jnp.sum(jnp.where(keep, per, 0.0))
  return total / jnp.maximum(jnp.sum(keep), 1).astype(_F32)
