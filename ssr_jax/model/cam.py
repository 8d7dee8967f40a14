"""GradCAM on CLIP image-text logits, for all present classes of a batch at once (method §1.3).

The target layer is ln_1 of the last visual block. One forward of that block is shared by all
classes: `jax.vjp` gives a pullback that we vmap over the padded class axis, so K classes cost K
batched backward passes of a single block and the step compiles once for any label set.
"""

import jax
import jax.numpy as jnp


def present_classes(labels, *, max_classes):
  """Pads each image's present classes to a fixed count.

  Args:
    labels: [B, C] multi-hot image-level labels (foreground only).
    max_classes: K, the padded count. Extra present classes beyond K are dropped (highest ids).

  Returns:
    class_ids [B, K] int32 (ascending among present; padding repeats class 0), valid [B, K] bool.
  """
  c = labels.shape[-1]
  # Present classes first, in ascending id order; the small ramp breaks ties deterministically.
  score = (labels > 0).astype(jnp.float32) * 2.0 - jnp.arange(c, dtype=jnp.float32) / c
  _, ids = jax.lax.top_k(score, max_classes)
  valid = jnp.take_along_axis(labels > 0, ids, axis=-1)
  return jnp.where(valid, ids, 0).astype(jnp.int32), valid


def clip_scores(v, text_fg, text_bg, labels, *, logit_scale):
  """Softmax scores of pooled image features over present fg classes + all bg names.

  Args:
    v: [B, D] projected image features (not normalised).
    text_fg: [C, D], text_bg: [Kb, D] L2-normalised text embeddings.
    labels: [B, C] multi-hot; absent fg classes are masked out of the softmax (§1.3).

  Returns:
    [B, C + Kb] probabilities (absent fg entries are 0).
  """
  v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  logits = logit_scale * v @ jnp.concatenate([text_fg, text_bg], axis=0).T
  keep = jnp.concatenate([labels > 0, jnp.ones((v.shape[0], text_bg.shape[0]), bool)], axis=-1)
  return jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)


def minmax_normalize(x, *, axes, eps=1e-7):
  """(x - min) / (max(x - min) + eps) over `axes`: pytorch_grad_cam's scale_cam_image."""
  x = x - x.min(axis=axes, keepdims=True)
  return x / (x.max(axis=axes, keepdims=True) + eps)


def gradcam_normalize(cams, *, axes=-1):
  """WeCLIP's CAM scaling: `minmax_normalize` twice, in float32 (method §1.3).

  pytorch_grad_cam scales each layer's map, then scales again after aggregating layers (one
  layer here, so the mean and ReLU between the two are identities). The second pass keeps the
  maximum at 1 / (1 + 1e-7) < 1 even when the raw maximum is large (where one pass gives exactly
  1.0), so uint8(cam * 255) peaks at 254, not 255: that sets WeCLIP's box threshold
  (`affinity.box_masks`).
  """
  cams = cams.astype(jnp.float32)
  return minmax_normalize(minmax_normalize(cams, axes=axes), axes=axes)


def gradcam(block_fn, act, class_ids, valid, text_fg, text_bg, labels, *, logit_scale, grid):
  """GradCAM maps of the padded present classes.

  Args:
    block_fn: act [B, T, W] -> (v [B, D] projected pooled features, aux). The last block run on
      its ln_1 output, then ln_post on every token, the patch mean and the projection (§1.3).
    act: [B, T, W] the target activation (ln_1 output of the last block; CLS first).
    class_ids, valid: [B, K] from `present_classes`.
    text_fg [C, D], text_bg [Kb, D], labels [B, C]: as in `clip_scores`.
    grid: (h, w) patch grid, N = h*w = T - 1.

  Returns:
    cams [B, K, h, w] float32 in [0, 1), scaled by `gradcam_normalize` (zero for invalid
    entries), aux of block_fn.
  """
  v_out, pullback, aux = jax.vjp(block_fn, act, has_aux=True)
  v = v_out.astype(jnp.float32)

  def score(v, k):  # d softmax[class_ids[:, k]] / d v, for every image at once.
    s = clip_scores(v, text_fg, text_bg, labels, logit_scale=logit_scale)
    return jnp.take_along_axis(s, jnp.take(class_ids, k, axis=1)[:, None], axis=-1).sum()

  k = class_ids.shape[1]
  dv = jax.vmap(jax.grad(score), in_axes=(None, 0))(v, jnp.arange(k))  # [K, B, D]
  (g,) = jax.vmap(pullback)(dv.astype(v_out.dtype))  # [K, B, T, W]
  g = g[:, :, 1:].astype(jnp.float32)
  a = act[:, 1:].astype(jnp.float32)
  weights = g.mean(axis=2)  # [K, B, W]: channel weights = spatially averaged gradients.
  cams = jax.nn.relu(jnp.einsum("kbw,bnw->bkn", weights, a))
  cams = gradcam_normalize(cams, axes=-1)
  cams = jnp.where(valid[..., None], cams, 0.0)
  return cams.reshape(*cams.shape[:2], *grid), aux
