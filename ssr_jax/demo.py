"""The embedded demo: synthetic data, a tiny CLIP pretrained in-process, SSR train + eval, ablation.

Nothing is downloaded: the dataset is generated, the CLIP is trained contrastively on
synthetic images and their captions, and then the same code path as configs/voc.py runs.
Everything is cached under the workdir, so a rerun skips finished stages.

The tiny CLIP (3 blocks, width 96, patch 8, 96 px) sees its own synthetic stream
(`synthetic.generate(..., stream=2, decorrelated=True)`: any object on any background, riders
still only on horses), standing in for the broad web data of a real CLIP, while the WSSS splits
keep their correlations. It is trained with CLIP's InfoNCE on image-caption pairs only: CLS and
patch-mean embeddings of whole images, plus patch-mean embeddings of the quadrants of 2x2
mosaics against their tiles' captions (`pretrain_clip`). The mosaic term is what makes the
tiny CLIP's patch tokens local enough for WeCLIP's GradCAM and attention affinities; without it
the CAMs of this tiny CLIP were often inverted (high on the background).
"""

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssr_jax.clip import convert
from ssr_jax.clip.model import CLIP, CLIPConfig, init_params
from ssr_jax.clip.preprocess import normalize
from ssr_jax.clip.tokenizer import tokenize

log = logging.getLogger(__name__)

# Weight of the tiny CLIP's mosaic (region-caption) term, see pretrain_clip. 1.0 gave lower
# zero-shot accuracy and CAM mIoU than 0.5 in our sweep (one pretraining run each).
MOSAIC_WEIGHT = 0.5

# ------------------------------------------------------------------ data


def data_root(workdir):
  return os.path.join(workdir, "data")


def ensure_data(config, workdir):
  """Generates the synthetic dataset and its superpixels under workdir/data (once)."""
  from ssr_jax.data import superpixels, synthetic

  root = config.data.root or data_root(workdir)
  sc = config.data.synthetic
  with config.unlocked():
    config.data.root = root
  t0 = time.time()
  synthetic.write_dataset(
    root, num_train=sc.num_train, num_val=sc.num_val, size=sc.image_size, seed=sc.seed
  )
  for split in (config.data.train_split, config.data.val_split):
    superpixels.precompute(config.data, split, workers=os.cpu_count() or 1, progress=False)
  log.info("synthetic data ready under %s (%.1fs)", root, time.time() - t0)
  return root


# ------------------------------------------------------------------ tiny CLIP pretraining


def tiny_clip_config(config) -> CLIPConfig:
  d = config.demo
  return CLIPConfig(
    embed_dim=d.clip_width,
    image_size=config.data.crop_size,
    patch_size=d.clip_patch,
    vision_width=d.clip_width,
    vision_layers=d.clip_layers,
    vision_heads=4,
    context_length=24,
    text_width=d.clip_width,
    text_layers=2,
    text_heads=4,
  )


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
  Returns (params, final loss).
  """
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
    patch = model.apply(
      {"params": p}, feats["hidden"][-1][:, 1:].mean(axis=1), method=model.visual_head
    )
    txt = model.apply({"params": p}, t, method=model.encode_text)
    loss = 0.5 * (_contrastive(feats["pooled"], txt, scale) + _contrastive(patch, txt, scale))
    if xm is not None:
      tok = model.apply({"params": p}, xm, method=model.image_features)["hidden"][-1][:, 1:]
      h = grid // 2
      quad = tok.reshape(-1, 2, h, 2, h, tok.shape[-1]).mean(axis=(2, 4))  # [M, 2, 2, W]
      quad = model.apply({"params": p}, quad.reshape(-1, tok.shape[-1]), method=model.visual_head)
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

  loss = jnp.nan
  for i in range(steps):
    params, opt, loss = step(params, opt, jax.random.fold_in(rng, i))
    if (i + 1) % max(1, steps // 5) == 0:
      log.info("tiny CLIP pretraining %d/%d loss %.4f", i + 1, steps, float(loss))
  return params, float(loss)


def zero_shot_accuracy(model, params, images, labels, class_names, template, normalization):
  """Fraction of images whose top-scoring class (CLS embedding vs prompts) is present."""
  ids = jnp.asarray(
    tokenize([template.format(n) for n in class_names], context_length=model.cfg.context_length)
  )
  p = {"params": params}
  txt = model.apply(p, ids, method=model.encode_text)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  enc = jax.jit(lambda x: model.apply(p, normalize(x, normalization), method=model.encode_image))
  hits = []
  for i in range(0, len(images), 64):
    img = enc(jnp.asarray(images[i : i + 64]))
    top = np.asarray(jnp.argmax(img @ txt.T, axis=-1))
    hits.append(labels[i : i + 64][np.arange(len(top)), top] > 0)
  return float(np.concatenate(hits).mean())


def ensure_tiny_clip(config, workdir):
  """Path of the demo's pretrained tiny CLIP (.npz), training it first if not cached.

  The tiny CLIP is pretrained on its own synthetic stream (`decorrelated=True`: any object on
  any background), standing in for the broad image-text data a real CLIP sees; the WSSS train
  split keeps its correlations (boats on water, riders on horses) for SSR to cope with. Only
  images and captions are used, never masks (see `pretrain_clip` for the loss).
  """
  from ssr_jax.data import synthetic

  path = os.path.join(workdir, "clip", "tiny_clip.npz")
  if os.path.exists(path):
    return path
  d, sc = config.demo, config.data.synthetic
  corpus = synthetic.generate(
    d.clip_images, size=sc.image_size, seed=sc.seed + 1000, stream=2, decorrelated=True
  )
  val = synthetic.read_split(config.data.root, config.data.val_split)
  model = CLIP(tiny_clip_config(config))
  t0 = time.time()
  params, loss = pretrain_clip(
    model,
    corpus["image"],
    corpus["caption"],
    steps=d.clip_steps,
    batch_size=d.clip_batch_size,
    lr=d.clip_lr,
    seed=config.seed,
    normalization=config.model.normalization,
  )
  acc = zero_shot_accuracy(
    model,
    params,
    val["image"],
    val["labels"],
    config.model.class_names,
    config.model.prompt_template,
    config.model.normalization,
  )
  info = dict(
    steps=d.clip_steps,
    images=d.clip_images,
    final_loss=loss,
    zero_shot_top1_present=acc,
    seconds=time.time() - t0,
  )
  print(
    f"tiny CLIP: {d.clip_steps} steps (batch {d.clip_batch_size} + "
    f"{num_mosaics(d.clip_batch_size)} 2x2 mosaics) on "
    f"{d.clip_images} decorrelated synthetic image-caption pairs in {info['seconds']:.0f}s, "
    f"loss {loss:.3f}, zero-shot accuracy on val (top-1 class present) {acc:.3f}"
  )
  os.makedirs(os.path.dirname(path), exist_ok=True)
  convert.save_converted(path, model.cfg, params, meta=dict(demo_pretraining=info))
  with open(os.path.join(workdir, "clip", "pretraining.json"), "w") as f:
    json.dump(info, f, indent=2)
  return path


# ------------------------------------------------------------------ demo runs


def train_and_eval(config, workdir):
  """Train SSR, then evaluate seg / cam / pseudo on val; prints and returns the metrics."""
  from ssr_jax import experiment

  experiment.train(config, workdir)
  results = {}
  for target in ("cam", "pseudo", "seg"):
    with config.unlocked():
      config.eval.target = target
      config.eval.split = config.data.val_split
    results[target] = experiment.evaluate(config, workdir)["miou"]
  out = os.path.join(workdir, "eval")
  print(
    f"demo mIoU on val: CAM {results['cam']:.3f}  pseudo-labels {results['pseudo']:.3f}  "
    f"segmentation {results['seg']:.3f}"
  )
  print(f"metrics, predictions and visualisations: {out}")
  return results


VARIANTS = (
  ("baseline", False, False),
  ("+CMPA", True, False),
  ("+SGC", False, True),
  ("SSR (CMPA+SGC)", True, True),
)


def ablation(config, workdir):
  """Baseline / +CMPA / +SGC / full SSR with the same seeds; writes workdir/ablation.md."""
  rows = []
  for name, use_cmpa, use_sgc in VARIANTS:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.model.cmpa.enabled = use_cmpa
      cfg.model.sgc.enabled = use_sgc
    sub = os.path.join(workdir, "ablation", name.split()[0].replace("+", "plus_").lower())
    os.makedirs(sub, exist_ok=True)
    os.makedirs(os.path.join(workdir, "clip"), exist_ok=True)
    link = os.path.join(sub, "clip")  # Every variant uses the one pretrained tiny CLIP.
    if not os.path.exists(link):
      os.symlink(os.path.abspath(os.path.join(workdir, "clip")), link)
    ensure_tiny_clip(cfg, workdir)
    res = train_and_eval(cfg, sub)
    rows.append((name, res))
  lines = [
    f"Synthetic demo ablation (seed {config.seed}, data seed {config.data.synthetic.seed}, "
    f"{config.train.num_steps} steps; mIoU on val)",
    "",
    "| variant | CAM | pseudo-labels | segmentation |",
    "|---|---|---|---|",
  ]
  lines += [f"| {n} | {r['cam']:.3f} | {r['pseudo']:.3f} | {r['seg']:.3f} |" for n, r in rows]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(text)
  print(text)
  return rows
