"""The embedded demo: synthetic data, a tiny CLIP pretrained in-process, SSR train + eval, ablation.

Nothing is downloaded: the dataset is generated, the CLIP is trained contrastively on the
synthetic images and their captions, and then the same code path as configs/voc.py runs.
Everything is cached under the workdir, so a rerun skips finished stages.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ssr_jax.clip import convert
from ssr_jax.clip.model import CLIP, CLIPConfig, init_params
from ssr_jax.clip.tokenizer import tokenize
from ssr_jax.model.ssr import normalize

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
  logging.info("synthetic data ready under %s (%.1fs)", root, time.time() - t0)
  return root


# ------------------------------------------------------------------ tiny CLIP pretraining


def tiny_clip_config(config) -> CLIPConfig:
  d = config.demo
  return CLIPConfig(
      embed_dim=d.clip_width, image_size=config.data.crop_size, patch_size=d.clip_patch,
      vision_width=d.clip_width, vision_layers=d.clip_layers, vision_heads=4, context_length=24,
      text_width=d.clip_width, text_layers=2, text_heads=4,
  )  # fmt: skip


def _contrastive(img, txt, scale):
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  logits = jnp.exp(scale) * img @ txt.T
  target = jnp.arange(img.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (ce(logits, target).mean() + ce(logits.T, target).mean())


def pretrain_clip(
  model: CLIP, images, captions, *, steps, batch_size, lr, seed, normalization, pool="both"
):
  """Contrastive CLIP training on (uint8 images [N, H, W, 3], captions) pairs.

  The image side is trained through both the CLS embedding and the patch-token mean: WeCLIP's
  GradCAM pools the patch mean (§1.3), which a from-scratch CLIP only aligns with text if it is
  trained that way. Returns (params, final loss).
  """
  rng = jax.random.PRNGKey(seed)
  params = init_params(model, rng)
  ids = jnp.asarray(tokenize(list(captions), context_length=model.cfg.context_length))
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
  tx = optax.adamw(sched, weight_decay=0.05)
  opt = tx.init(params)
  images = jnp.asarray(images)

  def loss_fn(p, x, t):
    feats = model.apply({"params": p}, x, method=model.image_features)
    tok = feats["hidden"][-1]
    patch = model.apply({"params": p}, tok[:, 1:].mean(axis=1), method=model.visual_head)
    txt = model.apply({"params": p}, t, method=model.encode_text)
    scale = p["logit_scale"]
    if pool == "cls":
      return _contrastive(feats["pooled"], txt, scale)
    if pool == "mean":
      return _contrastive(patch, txt, scale)
    return 0.5 * (_contrastive(feats["pooled"], txt, scale) + _contrastive(patch, txt, scale))

  @jax.jit
  def step(p, o, key):
    k1, k2 = jax.random.split(key)
    idx = jax.random.choice(k1, images.shape[0], (batch_size,), replace=False)
    x = images[idx]
    flip = jax.random.bernoulli(k2, 0.5, (batch_size, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)  # Captions are flip-invariant.
    x = normalize(x, normalization)
    loss, g = jax.value_and_grad(loss_fn)(p, x, ids[idx])
    up, o = tx.update(g, o, p)
    p = optax.apply_updates(p, up)
    p["logit_scale"] = jnp.clip(p["logit_scale"], 0.0, np.log(100.0))
    return p, o, loss

  loss = jnp.nan
  for i in range(steps):
    params, opt, loss = step(params, opt, jax.random.fold_in(rng, i))
    if (i + 1) % max(1, steps // 10) == 0:
      logging.info("tiny CLIP pretraining %d/%d loss %.4f", i + 1, steps, float(loss))
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
  images and captions are used, never masks.
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
    model, corpus["image"], corpus["caption"], steps=d.clip_steps, batch_size=d.clip_batch_size,
    lr=d.clip_lr, seed=config.seed, normalization=config.model.normalization,
  )  # fmt: skip
  acc = zero_shot_accuracy(
    model, params, val["image"], val["labels"], config.model.class_names,
    config.model.prompt_template, config.model.normalization,
  )  # fmt: skip
  info = dict(steps=d.clip_steps, images=d.clip_images, final_loss=loss,
              zero_shot_top1_present=acc, seconds=time.time() - t0)  # fmt: skip
  print(f"tiny CLIP: {d.clip_steps} steps on {d.clip_images} decorrelated synthetic image-caption "
        f"pairs in {info['seconds']:.0f}s, loss {loss:.3f}, zero-shot accuracy on val (top-1 "
        f"class present) {acc:.3f}")  # fmt: skip
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
  print(f"demo mIoU on val: CAM {results['cam']:.3f}  pseudo-labels {results['pseudo']:.3f}  "
        f"segmentation {results['seg']:.3f}")  # fmt: skip
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
