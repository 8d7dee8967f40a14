"""Contrastive CLIP pretraining from scratch on (image, caption) pairs: the demo's tiny CLIP.

A real CLIP learns from broad web data; the embedded demo has none, so it trains a tiny CLIP on
a synthetic image-caption stream with CLIP's InfoNCE. The mosaic term (`pretrain_clip`) is what
makes the tiny CLIP's patch tokens local enough for WeCLIP's GradCAM and attention affinities;
without it the CAMs of this tiny CLIP were often inverted (high on the background).
"""

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssr_jax.clip.model import CLIP, init_params
from ssr_jax.clip.preprocess import normalize
from ssr_jax.clip.tokenizer import tokenize

log = logging.getLogger(__name__)

# Weight of the tiny CLIP's mosaic (region-caption) term, see pretrain_clip. 1.0 gave lower
# zero-shot accuracy and CAM mIoU than 0.5 in our sweep (one pretraining run each).
MOSAIC_WEIGHT = 0.5
# How the patch-token terms pool: ln_post on each token, then the mean, as WeCLIP's GradCAM does.
PATCH_POOLING = "ln_post_then_mean"


def _contrastive(img, txt, scale):
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  logits = jnp.exp(scale) * img @ txt.T
  target = jnp.arange(img.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (ce(logits, target).mean() + ce(logits.T, target).mean())


def _mosaics(images, key, *, num):
  """num 2x2 mosaics of 4*num random images, each tile the image downsampled 2x (area mean).

  images: uint8 [N, S, S, 3] (S even). Returns (mosaics float32 0-255 [num, S, S, 3], indices
  [4*num] of the tiles' source images, tile k of mosaic m at index 4m + k, k row-major).
  """
  n, s = images.shape[0], images.shape[1]
  idx = jax.random.choice(key, n, (4 * num,), replace=4 * num > n)
  small = images[idx].astype(jnp.float32).reshape(4 * num, s // 2, 2, s // 2, 2, 3).mean((2, 4))
  tiles = small.reshape(num, 2, 2, s // 2, s // 2, 3).transpose(0, 1, 3, 2, 4, 5)
  return tiles.reshape(num, s, s, 3), idx


def num_mosaics(batch_size: int, mosaic_weight: float = MOSAIC_WEIGHT) -> int:
  """Mosaics per tiny-CLIP pretraining step: one per 5 images, none without the mosaic term."""
  return batch_size // 5 if mosaic_weight > 0 else 0


def pretrain_clip(
  model: CLIP,
  images,
  captions,
  *,
  steps,
  batch_size,
  lr,
  seed,
  normalization,
  mosaic_weight=MOSAIC_WEIGHT,
  workdir=None,
  settings=None,
  save_every=100,
):
  """Contrastive CLIP training on (uint8 images [N, S, S, 3], captions) pairs.

  Three InfoNCE terms, all on image-caption pairs (never masks):
  - the CLS embedding and the patch-token mean of each image against its caption (0.5 each).
    WeCLIP's GradCAM pools the patch mean (§1.3), which a from-scratch CLIP only aligns with
    text if trained that way; the CLS term keeps the last block's value path text-aligned
    (patch-mean alone gave inverted CAMs in our sweep);
  - mosaic_weight x a region term: num_mosaics(batch_size) mosaics of 2x2 other images
    (downsampled 2x), where the patch-token mean of each quadrant must match that tile's
    caption. A token may then only carry what is near it, which makes the patch features, and
    so GradCAM and the attention affinities, local (without it the tiny CLIP's tokens mix
    globally).
  Step i's batch, flips and mosaics come from fold_in(PRNGKey(seed), i), so with workdir the run
  checkpoints (params and optimizer) with Orbax under workdir/checkpoints every save_every steps
  and at the end, and a rerun resumes from the latest checkpoint bit-identically
  (`ssr_jax.train.resumable`; settings: the JSON-able dict of everything the weights depend on,
  and a rerun with other settings is refused).
  Returns (params, dict(final_loss, seconds over all runs, steps_run by this call)).
  """
  from ssr_jax.train.resumable import Resumable  # Late: orbax only when pretraining.

  rng = jax.random.PRNGKey(seed)
  params = init_params(model, rng)
  ids = jnp.asarray(tokenize(list(captions), context_length=model.cfg.context_length))
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
  tx = optax.adamw(sched, weight_decay=0.05)
  opt = tx.init(params)
  images = jnp.asarray(images)
  size, grid = images.shape[1], model.cfg.grid
  mosaics = num_mosaics(batch_size, mosaic_weight)
  if mosaics and (size % 2 or grid % 2):
    raise ValueError(
      f"tiny CLIP mosaics need an even image size and patch grid, got {size} px and "
      f"{grid}x{grid} patches: set data.synthetic.image_size / demo.clip_patch accordingly"
    )

  def loss_fn(p, x, t, xm, tm):
    scale = p["logit_scale"]
    feats = model.apply({"params": p}, x, method=model.image_features)
    # The patch-token feature WeCLIP's GradCAM pools (ln_post per token, then the mean, §1.3).
    patch = model.apply({"params": p}, feats["hidden"][-1][:, 1:], method=model.patch_mean_head)
    txt = model.apply({"params": p}, t, method=model.encode_text)
    loss = 0.5 * (_contrastive(feats["pooled"], txt, scale) + _contrastive(patch, txt, scale))
    if xm is not None:
      tok = model.apply({"params": p}, xm, method=model.image_features)["hidden"][-1][:, 1:]
      h = grid // 2
      w = tok.shape[-1]
      quad = tok.reshape(-1, 2, h, 2, h, w).transpose(0, 1, 3, 2, 4, 5).reshape(-1, h * h, w)
      quad = model.apply({"params": p}, quad, method=model.patch_mean_head)  # [M*4, D]
      tile_txt = model.apply({"params": p}, tm, method=model.encode_text)
      loss = loss + mosaic_weight * _contrastive(quad, tile_txt, scale)
    return loss

  @jax.jit
  def step(p, o, key):
    k1, k2, k3 = jax.random.split(key, 3)
    idx = jax.random.choice(k1, images.shape[0], (batch_size,), replace=False)
    x = images[idx]
    flip = jax.random.bernoulli(k2, 0.5, (batch_size, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)  # Captions are flip-invariant.
    x = normalize(x, normalization)
    xm = tm = None
    if mosaics:
      xm, tiles = _mosaics(images, k3, num=mosaics)
      xm, tm = normalize(xm, normalization), ids[tiles]
    loss, g = jax.value_and_grad(loss_fn)(p, x, ids[idx], xm, tm)
    up, o = tx.update(g, o, p)
    p = optax.apply_updates(p, up)
    p["logit_scale"] = jnp.clip(p["logit_scale"], 0.0, np.log(100.0))
    return p, o, loss

  state, run, start, loss, t0 = dict(params=params, opt=opt), None, 0, float("nan"), time.time()
  if workdir is not None:
    run = Resumable(workdir, state, settings=settings or {}, what="tiny CLIP pretraining")
    start, state, loss = run.start, run.state, run.loss
  elapsed = run.elapsed if run else lambda: time.time() - t0
  try:
    for i in range(start, steps):
      p, o, step_loss = step(state["params"], state["opt"], jax.random.fold_in(rng, i))
      state = dict(params=p, opt=o)
      done = i + 1
      if done % max(1, steps // 5) == 0 or done == steps:
        loss = float(step_loss)
        log.info("tiny CLIP pretraining %d/%d loss %.4f %.0fs", done, steps, loss, elapsed())
      if run is not None and (done % save_every == 0 or done == steps):
        run.save(done, state, loss)
  finally:
    if run is not None:
      run.close()
  return state["params"], dict(final_loss=loss, seconds=elapsed(), steps_run=steps - start)


def zero_shot_scores(model, params, images, class_names, template, normalization):
  """uint8 images [B, S, S, 3] -> float32 [B, C] cosine of each image's embedding with each
  class prompt's (template.format(name))."""
  ids = jnp.asarray(
    tokenize([template.format(n) for n in class_names], context_length=model.cfg.context_length)
  )
  p = {"params": params}
  txt = model.apply(p, ids, method=model.encode_text)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  enc = jax.jit(lambda x: model.apply(p, normalize(x, normalization), method=model.encode_image))
  out = []
  for i in range(0, len(images), 64):
    img = enc(jnp.asarray(images[i : i + 64]))
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    out.append(np.asarray(img @ txt.T))
  return np.concatenate(out)


def zero_shot_accuracy(model, params, images, labels, class_names, template, normalization):
  """Fraction of images whose top-scoring class (CLS embedding vs prompts) is present."""
  s = zero_shot_scores(model, params, images, class_names, template, normalization)
  return float((labels[np.arange(len(s)), s.argmax(-1)] > 0).mean())


def mean_average_precision(scores, labels):
  """Image-level mAP: scores float [B, C], labels multi-hot [B, C] -> the mean over classes
  with a positive of average precision (precision at each positive, ranked by score; ties
  broken by order, as sklearn's average_precision_score for distinct scores)."""
  aps = []
  for c in range(scores.shape[1]):
    pos = labels[np.argsort(-scores[:, c], kind="stable"), c] > 0
    if pos.any():
      precision = np.cumsum(pos) / np.arange(1, len(pos) + 1)
      aps.append(precision[pos].mean())
  return float(np.mean(aps))
