"""Evaluation driver: restore a checkpoint, predict a split, score it, write PNGs and grids.

Targets (config.eval.target), as WSSS papers report them (§1.8):
- seg: the decoder, multi-scale + flip (+ optional dense CRF);
- cam: GradCAM maps alone, background = (1 - max cam) ** bg_power, argmax;
- pseudo: the refined online pseudo-labels (affinity propagation, SGC if enabled, PAR) in 'val'
  mode, i.e. with the RFM affinity of the trained decoder.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ssr_jax import resize as resize_lib
from ssr_jax.clip import preprocess
from ssr_jax.eval import crf, inference, metrics, png, visualize
from ssr_jax.eval.class_names import CLASS_NAMES
from ssr_jax.model import affinity
from ssr_jax.train import checkpoint, sharding, state


def class_names(data_name, fg_names):
  """Names of label ids 0..C-1 for tables (background first)."""
  if data_name in CLASS_NAMES:
    return list(CLASS_NAMES[data_name])
  return ["background"] + [n.split(",")[0] for n in fg_names]


def restore_params(config, workdir, task):
  """(params, step) of the checkpoint config.eval.checkpoint_step (-1 = latest) in workdir."""
  tx, _ = state.make_optimizer(config.train)
  s = config.data.crop_size
  fake = dict(image=jax.ShapeDtypeStruct((1, s, s, 3), jnp.uint8))
  create = functools.partial(state.create_train_state, task, tx)
  mesh = sharding.make_mesh()
  target = checkpoint.abstract_state(
    jax.eval_shape(create, jax.random.PRNGKey(0), fake), sharding.replicated(mesh)
  )
  step = None if config.eval.checkpoint_step < 0 else int(config.eval.checkpoint_step)
  restored = checkpoint.restore(workdir, target, step=step)
  return restored.params, int(restored.step)


def _multiple_of(image, multiple):
  """Float image resized so both sides are (nearest) multiples of the patch size."""
  h, w = image.shape[:2]
  size = (inference.round_to_multiple(h, multiple), inference.round_to_multiple(w, multiple))
  return inference.resize_np(image.astype(np.float32), size), size


def _nearest(labels, size):
  rows = resize_lib.interp_matrix(labels.shape[0], size[0], "nearest").argmax(1)
  cols = resize_lib.interp_matrix(labels.shape[1], size[1], "nearest").argmax(1)
  return labels[rows][:, cols]


@functools.partial(jax.jit, static_argnums=0)
def _cam_outputs(task, params, frozen, image, labels, superpixels):
  """CAM and pseudo-label maps of one image (compiled once per task and image shape)."""
  batch = dict(image=image[None], labels=labels[None], superpixels=superpixels[None])
  out = task.cam_outputs(params, frozen, batch)
  cams = out["cams"][0]  # [K, h, w]
  bg_power = task.model_cfg.cam.bg_power
  up = resize_lib.resize(jnp.moveaxis(cams, 0, -1), image.shape[:2], "bilinear")
  bg = jnp.maximum(1.0 - up.max(axis=-1, keepdims=True), 0.0) ** bg_power
  probs = jnp.concatenate([bg, up], axis=-1)[None]  # [1, H, W, 1+K]
  cam_labels = affinity.pseudo_labels(probs, out["ids"], out["valid"])[0]
  return dict(
    cam_labels=cam_labels,
    pseudo=out["labels"][0],
    cams=cams,
    ids=out["ids"][0],
    valid=out["valid"][0],
  )


def seg_predictions(task, frozen, params, images, eval_cfg, *, crf=False):
  """Multi-scale + flip decoder predictions for an iterable of uint8 images [H, W, 3].

  Yields (index, pred int32 [H, W]) in completion order, plus the averaged logits when crf.
  Batches are sharded over all devices (eval.batch_size rounded to the device count).
  """
  ec = eval_cfg
  mesh = sharding.make_mesh()
  bs = max(ec.batch_size // mesh.size, 1) * mesh.size
  mean, std = (
    np.asarray(v, np.float32) for v in preprocess.NORMALIZATION[task.model_cfg.normalization]
  )
  yield from inference.iter_predictions(
    task.normalized_seg_logits,
    ((np.asarray(im, np.float32) - mean) / std for im in images),
    params=(params, frozen),
    scales=tuple(ec.scales),
    flip=ec.flip,
    long_side=ec.long_side or None,
    multiple=task.clip.cfg.patch_size,
    batch_size=bs,
    sharding=sharding.batch_sharding(mesh),
    return_logits=crf,
  )


def evaluate(
  config,
  workdir,
  *,
  task,
  frozen,
  params,
  step,
  target,
  split,
  write_outputs=True,
  clip_fingerprint="",
):
  """Evaluates `target` on `split`; writes workdir/eval/metrics.json (+ per-run copy)."""
  from ssr_jax.data import pipeline

  ec, dc = config.eval, config.data
  if target not in ("seg", "cam", "pseudo"):
    raise ValueError(f"eval.target={target!r}: use seg, cam or pseudo")
  if ec.crf and target == "seg":
    crf.import_densecrf()  # Fail before the long loop if the optional package is missing.
  dataset = pipeline.make_eval_dataset(
    dc, split, superpixels=config.model.sgc.enabled and target == "pseudo", max_images=ec.max_images
  )
  names = class_names(dc.name, config.model.class_names)
  acc = metrics.ConfusionAccumulator(dc.num_classes, ignore=dc.ignore_label)
  out_dir = os.path.join(workdir, "eval", f"{split}_{target}")
  patch = task.clip.cfg.patch_size
  t0 = time.time()
  vis_images = {}
  count = 0

  def cam_outputs(ex):
    img, size = _multiple_of(ex["image"], patch)
    sp = _nearest(ex["superpixels"], size).astype(np.int32)
    labels = jnp.asarray(ex["labels"], jnp.float32)
    return _cam_outputs(task, params, frozen, jnp.asarray(img), labels, jnp.asarray(sp))

  def handle(i, ex, pred):
    nonlocal count
    count += 1
    if ex.get("mask") is not None:
      acc.add(pred, ex["mask"])
    if write_outputs and ec.save_png:
      png.save_label_png(os.path.join(out_dir, "pred", f"{ex['id']}.png"), pred.astype(np.uint8))
    if i >= ec.num_vis:
      return
    o = cam_outputs(ex)
    cams = {
      names[int(c) + 1]: np.asarray(o["cams"][k])
      for k, c in enumerate(np.asarray(o["ids"]))
      if o["valid"][k]
    }
    pseudo = _nearest(np.asarray(o["pseudo"]), ex["image"].shape[:2])
    vis_images[f"{split}_{target}/{ex['id']}"] = visualize.grid(
      ex["image"], cams, pseudo, pred, ex.get("mask"), names
    )
    if write_outputs:
      visualize.save_grid(
        os.path.join(out_dir, "vis", f"{ex['id']}.png"),
        ex["image"],
        cams,
        pseudo,
        pred,
        ex.get("mask"),
        names,
      )

  if target == "seg":
    pending = {}  # Examples waiting in a size bucket; bounded by the bucket batch size.

    def images():
      for i, ex in enumerate(dataset):
        pending[i] = ex
        yield ex["image"]

    for i, pred, *logits in seg_predictions(task, frozen, params, images(), ec, crf=ec.crf):
      ex = pending.pop(i)
      if ec.crf:
        pred = crf.crf_predict(
          ex["image"],
          logits[0],
          iter_max=ec.crf_iters,
          pos_xy_std=ec.crf_pos_xy_std,
          pos_w=ec.crf_pos_w,
          bi_xy_std=ec.crf_bi_xy_std,
          bi_rgb_std=ec.crf_bi_rgb_std,
          bi_w=ec.crf_bi_w,
        )
      handle(i, ex, pred)
  else:
    key = "cam_labels" if target == "cam" else "pseudo"
    for i, ex in enumerate(dataset):
      handle(i, ex, _nearest(np.asarray(cam_outputs(ex)[key]), ex["image"].shape[:2]))

  seconds = time.time() - t0
  res = acc.scores(names)
  res.update(
    target=target,
    split=split,
    num_images=count,
    checkpoint_step=step,
    seconds=seconds,
    scales=list(ec.scales) if target == "seg" else [1.0],
    flip=bool(ec.flip and target == "seg"),
    crf=bool(ec.crf and target == "seg"),
    dataset=dc.name,
    clip_fingerprint=clip_fingerprint,
    jax_version=jax.__version__,
  )
  print(f"\n{split} / {target} @ step {step}: {count} images in {seconds:.1f}s")
  print(metrics.format_table(res))
  if write_outputs:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    for path in (
      os.path.join(workdir, "eval", "metrics.json"),
      os.path.join(workdir, "eval", f"metrics_{split}_{target}.json"),
    ):
      with open(path, "w") as f:
        json.dump(res, f, indent=2)
    logging.info("wrote %s", out_dir)
  res["images"] = vis_images
  return res
