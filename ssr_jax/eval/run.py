"""Evaluation: restore the variables, predict a split, score it, write PNGs and grids.

Targets (config.eval.targets), as WSSS papers report them (§1.8), one prediction function each,
all yielding (example, pred int32 [H, W]):
- seg (`predict_seg`): the decoder, multi-scale + flip (+ optional dense CRF);
- cam (`predict_cam`): GradCAM maps alone (of model.cam.source: through CMPA's trained heads,
  or frozen CLIP), background = (1 - max cam) ** bg_power, argmax;
- clip_cam (`predict_cam` with source "clip"): frozen CLIP's GradCAM whatever the model's source,
  the paper's reference row for CMPA's CAMs;
- pseudo (`predict_pseudo`): the refined online pseudo-labels (affinity propagation, SGC if
  enabled, PAR) in 'val' mode, i.e. with the RFM affinity of the trained decoder.

Outputs go under <workdir>/eval/, named by `split_label(split)` (a list file's stem, made safe):
<label>_<target>/pred/<id>.png, <label>_<target>/vis/<id>.png and metrics_<label>_<target>.json;
`write_metrics` writes metrics.json, every split and target of one evaluation.

Several processes: each evaluates its own slice of the split on its own devices; the confusion
matrices are summed across processes and process 0 writes the metrics and the grids.
"""

import functools
import json
import logging as pylogging
import os
import re
import time
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ssr_jax import resize as resize_lib
from ssr_jax.clip import preprocess
from ssr_jax.data import files, pipeline, sources
from ssr_jax.eval import crf, image_level, inference, metrics, png, visualize
from ssr_jax.model import affinity
from ssr_jax.model.ssr import sgc_inputs
from ssr_jax.train import checkpoint, sharding

TARGETS = ("seg", "cam", "clip_cam", "pseudo")


class ReadOnlyNotice(pylogging.Filter):
  """Drops Orbax's "Given directory is read only" warning: evaluation and predict.py open the
  checkpoints read-only on purpose, each time."""

  def filter(self, record):
    return "Given directory is read only" not in record.getMessage()


def quiet_read_only_notices() -> None:
  """Installs `ReadOnlyNotice` on the absl logger (once)."""
  logger = pylogging.getLogger("absl")
  if not any(isinstance(f, ReadOnlyNotice) for f in logger.filters):
    logger.addFilter(ReadOnlyNotice())


def process() -> tuple[int, int]:
  """(index, count) of this process among those evaluating (jax's)."""
  return jax.process_index(), jax.process_count()


def local_mesh():
  """1-D mesh over this process's devices: inference never communicates between processes."""
  return sharding.make_mesh(jax.local_devices())


def restore_variables(workdir, task, *, step: int | None = None):
  """(variables, step) of checkpoint `step` (None = latest), replicated over this process's
  devices: the params and the collections inference needs (`task.inference_collections`, e.g.
  the heads' BatchNorm statistics). Nothing else is read (checkpoint.restore_variables), so the
  train config may differ.
  """
  p = task.clip.cfg.patch_size
  fake = dict(image=jax.ShapeDtypeStruct((1, p, p, 3), jnp.uint8))
  target = jax.eval_shape(task.init, jax.random.PRNGKey(0), fake)
  keep = ("params", *task.inference_collections)
  target = {k: v for k, v in target.items() if k in keep}
  target = checkpoint.abstract_state(target, sharding.replicated(local_mesh()))
  return checkpoint.restore_variables(workdir, target, step=step)


def to_local(tree):
  """Global (multi-process) replicated arrays as this process's copy; other leaves unchanged."""

  def leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return x

  return jax.tree.map(leaf, tree)


def class_names(fg_names) -> list[str]:
  """Names of label ids 0..C-1 for tables (background first) from a dataset's foreground names."""
  return ["background"] + [n.split(",")[0] for n in fg_names]


def _multiple_of(image, multiple):
  """Float image resized so both sides are (nearest) multiples of the patch size."""
  h, w = image.shape[:2]
  size = (inference.round_to_multiple(h, multiple), inference.round_to_multiple(w, multiple))
  return inference.resize_np(image.astype(np.float32), size), size


def _nearest(labels, size):
  rows = resize_lib.interp_matrix(labels.shape[0], size[0], "nearest").argmax(1)
  cols = resize_lib.interp_matrix(labels.shape[1], size[1], "nearest").argmax(1)
  return labels[rows][:, cols]


@functools.partial(jax.jit, static_argnums=0, static_argnames="source")
def _cam_outputs(task, variables, frozen, image, labels, superpixels, clusters, *, source=None):
  """CAM and pseudo-label maps of one image (compiled once per task, source and image shape)."""
  batch = dict(
    image=image[None], labels=labels[None], superpixels=superpixels[None], clusters=clusters[None]
  )
  out = task.cam_outputs(variables, frozen, batch, source=source)
  cams = out["cams"][0]  # [K, h, w]
  up = resize_lib.resize(jnp.moveaxis(cams, 0, -1), image.shape[:2], "bilinear")
  bg = affinity.background(up, task.options.cam.bg_power, axis=-1)
  probs = jnp.concatenate([bg, up], axis=-1)[None]  # [1, H, W, 1+K]
  cam_labels = affinity.pseudo_labels(probs, out["ids"], out["valid"])[0]
  return dict(
    cam_labels=cam_labels,
    pseudo=out["labels"][0],
    cams=cams,
    ids=out["ids"][0],
    valid=out["valid"][0],
  )


def cam_outputs(task, frozen, variables, ex, *, source=None) -> dict:
  """`_cam_outputs` of one eval example (image resized to patch multiples), on the device.

  source: GradCAM logits of "cmpa" or "clip"; None = model.cam.source."""
  img, size = _multiple_of(ex["image"], task.clip.cfg.patch_size)
  sp = _nearest(ex["superpixels"], size).astype(np.int32)
  cl = _nearest(ex["clusters"], size).astype(np.int32)
  labels = jnp.asarray(ex["labels"], jnp.float32)
  return _cam_outputs(
    task,
    variables,
    frozen,
    jnp.asarray(img),
    labels,
    jnp.asarray(sp),
    jnp.asarray(cl),
    source=source,
  )


def process_batch_size(eval_cfg, mesh) -> int:
  """This process's share of the global eval.batch_size: batch_size / P processes, rounded down
  to a multiple of its device count (at least one image per device)."""
  per_process = eval_cfg.batch_size // process()[1]
  return max(per_process // mesh.size, 1) * mesh.size


def plan_seg_batches(shapes, eval_cfg, *, multiple: int, mesh=None) -> list:
  """`inference.plan_batches` of this process's images of shapes [(H, W)]: per network input
  size, one batch no larger than the images at hand (rounded up to the device count) and at
  most `process_batch_size`."""
  mesh = local_mesh() if mesh is None else mesh
  return inference.plan_batches(
    shapes,
    limit=process_batch_size(eval_cfg, mesh),
    devices=mesh.size,
    long_side=eval_cfg.long_side or None,
    multiple=multiple,
  )


def seg_predictions(
  task, frozen, variables, images, eval_cfg, *, crf=False, mesh=None, batch_size=None
):
  """Multi-scale + flip decoder predictions for an iterable of uint8 images [H, W, 3].

  Yields (index, pred int32 [H, W]) in completion order, plus the averaged logits when crf.
  Batches are sharded over `mesh` (default: this process's devices). batch_size: this process's
  batch, a multiple of its device count (e.g. from `plan_seg_batches`); default
  `process_batch_size`.
  """
  ec = eval_cfg
  mesh = local_mesh() if mesh is None else mesh
  bs = process_batch_size(ec, mesh) if batch_size is None else batch_size
  yield from inference.iter_predictions(
    task.normalized_seg_logits,
    _normalized(images, task.options.normalization),
    params=(variables, frozen),
    scales=tuple(ec.scales),
    flip=ec.flip,
    long_side=ec.long_side or None,
    multiple=task.clip.cfg.patch_size,
    batch_size=bs,
    sharding=sharding.batch_sharding(mesh),
    return_logits=crf,
  )


def _normalized(images: Iterable, normalization: str) -> Iterator[np.ndarray]:
  mean, std = (np.asarray(v, np.float32) for v in preprocess.NORMALIZATION[normalization])
  for im in images:
    yield (np.asarray(im, np.float32) - mean) / std


def predict_seg(task, frozen, variables, dataset, eval_cfg) -> Iterator[tuple]:
  """(example, pred int32 [H, W]) of the decoder (+ dense CRF when eval.crf), completion order.

  dataset: an EvalDataset. Its images are read size group by size group (`plan_seg_batches` of
  their header sizes), each group in batches no larger than it, so a few images of several sizes
  are not each padded to eval.batch_size."""
  ec = eval_cfg
  plan = plan_seg_batches(dataset.image_sizes(), ec, multiple=task.clip.cfg.patch_size)
  for batch_size, positions in plan:
    yield from _predict_seg_group(task, frozen, variables, dataset, positions, ec, batch_size)


def _predict_seg_group(task, frozen, variables, dataset, positions, ec, batch_size):
  pending = {}  # Examples waiting for their batch; at most batch_size - 1.

  def images():
    for k, ex in enumerate(dataset.iterate(positions)):
      pending[k] = ex
      yield ex["image"]

  preds = seg_predictions(task, frozen, variables, images(), ec, crf=ec.crf, batch_size=batch_size)
  for k, pred, *logits in preds:
    ex = pending.pop(k)
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
    yield ex, pred


def _predict_cam_key(task, frozen, variables, dataset, key, source=None):
  for ex in dataset:
    out = cam_outputs(task, frozen, variables, ex, source=source)
    yield ex, _nearest(np.asarray(out[key]), ex["image"].shape[:2])


def predict_cam(
  task, frozen, variables, dataset: Iterable[dict], *, source=None
) -> Iterator[tuple]:
  """(example, pred int32 [H, W]) of GradCAM alone (argmax with the bg_power background).

  source: "cmpa" (through the heads) or "clip" (frozen CLIP); None = model.cam.source."""
  yield from _predict_cam_key(task, frozen, variables, dataset, "cam_labels", source)


def predict_pseudo(task, frozen, variables, dataset: Iterable[dict]) -> Iterator[tuple]:
  """(example, pred int32 [H, W]) of the refined pseudo-labels in 'val' mode (RFM affinity)."""
  yield from _predict_cam_key(task, frozen, variables, dataset, "pseudo")


def vis_grid(task, frozen, variables, ex, pred, names, *, source=None) -> np.ndarray:
  """The qualitative grid of one example: image | CAMs | pseudo-label | pred | gt."""
  o = cam_outputs(task, frozen, variables, ex, source=source)
  cams = {
    names[int(c) + 1]: np.asarray(o["cams"][k])
    for k, c in enumerate(np.asarray(o["ids"]))
    if o["valid"][k]
  }
  pseudo = _nearest(np.asarray(o["pseudo"]), ex["image"].shape[:2])
  return visualize.grid(ex["image"], cams, pseudo, pred, ex.get("mask"), names)


def _all_processes_sum(conf: np.ndarray, count: int) -> tuple[np.ndarray, int]:
  """Confusion matrix and image count summed over processes (unchanged with one process)."""
  if process()[1] == 1:
    return conf, count
  gathered = multihost_utils.process_allgather(
    dict(conf=conf, count=np.asarray(count, np.int64)), tiled=False
  )
  return np.asarray(gathered["conf"]).sum(0), int(np.asarray(gathered["count"]).sum())


def eval_dataset(data_cfg, split, *, target, sgc: dict, max_images: int = 0):
  """(this process's slice of `split`, class names of ids 0..C-1 from the dataset).

  sgc: {"superpixels": bool, "clusters": bool}, what SGC reads (model.ssr.sgc_inputs)."""
  index, processes = process()
  pseudo = target == "pseudo"
  dataset = pipeline.make_eval_dataset(
    data_cfg,
    split,
    # Only pseudo-labels with SGC need superpixels / clusters (required then); the seg/cam grids'
    # pseudo panel is drawn without them (without SGC), so seg eval needs none.
    superpixels=sgc["superpixels"] and pseudo,
    clusters=sgc["clusters"] and pseudo,
    max_images=max_images,
    process_index=index,
    process_count=processes,
  )
  return dataset, class_names(sources.class_names(data_cfg))


def _all_processes_rows(rows: np.ndarray) -> np.ndarray:
  """[N_p, K] rows of every process's slice, concatenated in process order."""
  if process()[1] == 1:
    return rows
  counts = multihost_utils.process_allgather(np.asarray(len(rows), np.int64), tiled=False)
  padded = np.zeros((int(np.max(counts)), rows.shape[1]), rows.dtype)
  padded[: len(rows)] = rows
  gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
  return np.concatenate([g[:n] for g, n in zip(gathered, np.asarray(counts).ravel())])


def image_level_scores(task, frozen, ex, pred, target) -> list[np.ndarray]:
  """[labels, zero-shot scores(, seg pixel shares)] of one example (image_level.py)."""
  img, _ = _multiple_of(ex["image"], task.clip.cfg.patch_size)
  out = [np.asarray(ex["labels"], np.float32), image_level.zero_shot_scores(task, frozen, img)]
  if target == "seg":
    out.append(image_level.pixel_shares(pred, len(ex["labels"]) + 1))
  return out


def image_level_results(rows: list, names) -> dict:
  """zero_shot (and seg_classification) mAP of the rows of image_level_scores."""
  cols = [_all_processes_rows(np.stack(c)) for c in zip(*rows)] if rows else []
  if not cols:
    return {}
  res = {"zero_shot": image_level.mean_average_precision(cols[1], cols[0], names[1:])}
  if len(cols) > 2:
    res["seg_classification"] = image_level.mean_average_precision(cols[2], cols[0], names[1:])
  return res


def _protocol(eval_cfg, data_cfg, target) -> dict:
  """How the numbers were made, stored beside them in metrics.json."""
  seg = target == "seg"
  return dict(
    scales=list(eval_cfg.scales) if seg else [1.0],
    flip=bool(eval_cfg.flip and seg),
    crf=bool(eval_cfg.crf and seg),
    dataset=data_cfg.name,
    jax_version=jax.__version__,
  )


def split_label(split: str) -> str:
  """The name of a split in output paths and metric keys: the split itself, or the stem of a
  list file ("/data/lists/val.txt" -> "val"), with characters other than letters, digits, "_",
  "-" and "." replaced by "_", so outputs always land inside the workdir's eval/ folder."""
  if split.endswith(".txt") or "/" in split or os.sep in split:
    split = epath.Path(split).stem
  return re.sub(r"[^A-Za-z0-9_.-]", "_", split).strip(".") or "split"


def confusion_key(label: str, target: str) -> str:
  """The name of an evaluation's confusion heatmap among its images (TensorBoard tag); label:
  `split_label`."""
  return f"{label}_{target}/confusion_matrix"


def _write(res, images, workdir, label, target) -> None:
  """eval/metrics_<label>_<target>.json, the grids under eval/<label>_<target>/vis/ and the
  confusion heatmap beside them (eval/<label>_<target>/confusion.png)."""
  eval_dir = epath.Path(workdir) / "eval"
  files.write_bytes(eval_dir / f"metrics_{label}_{target}.json", json.dumps(res, indent=2).encode())
  out_dir = eval_dir / f"{label}_{target}"
  heatmap = confusion_key(label, target)
  for key, g in images.items():
    path = (
      out_dir / "confusion.png"
      if key == heatmap
      else out_dir / "vis" / f"{key.split('/', 1)[1]}.png"
    )
    visualize.save_image(path, g)
  logging.info("wrote %s", out_dir)


def write_metrics(workdir, results: dict) -> epath.Path:
  """eval/metrics.json: {split label: {target: metrics}} of one evaluation (the grids left out);
  returns its path. Each entry is also in its own metrics_<label>_<target>.json."""
  table = {
    sp: {t: {k: v for k, v in r.items() if k != "images"} for t, r in per.items()}
    for sp, per in results.items()
  }
  path = epath.Path(workdir) / "eval" / "metrics.json"
  files.write_bytes(path, json.dumps(table, indent=2).encode())
  return path


def evaluate(
  config,
  workdir,
  *,
  task,
  frozen,
  variables,
  step,
  target,
  split,
  write_outputs=True,
  clip_fingerprint="",
):
  """Evaluates `target` on `split` (a split name or a list file); writes its predictions, grids
  and workdir/eval/metrics_<label>_<target>.json (label: `split_label`).

  Returns the metrics, with "images": {name: grid} of the first eval.num_vis examples of this
  process's slice and the confusion heatmap (`confusion_key`) on process 0 (empty on the
  others).
  """
  ec, dc = config.eval, config.data
  if target not in TARGETS:
    raise ValueError(f"eval target {target!r}: use one of {TARGETS}")
  if ec.crf and target == "seg":
    crf.import_densecrf()  # Fail before the long loop if the optional package is missing.
  sc = task.options.sgc
  reads = sgc_inputs(sc.enabled, sc.grouping)
  dataset, names = eval_dataset(dc, split, target=target, sgc=reads, max_images=ec.max_images)
  frozen, variables = to_local(frozen), to_local(variables)
  source = "clip" if target == "clip_cam" else None
  predict = dict(
    seg=predict_seg,
    cam=predict_cam,
    clip_cam=functools.partial(predict_cam, source=source),
    pseudo=predict_pseudo,
  )[target]
  args = (task, frozen, variables, dataset) + ((ec,) if target == "seg" else ())
  lead = process()[0] == 0
  label = split_label(split)
  pred_dir = epath.Path(workdir) / "eval" / f"{label}_{target}" / "pred"
  acc = metrics.ConfusionAccumulator(dc.num_classes, ignore=dc.ignore_label)
  vis_images, count, t0 = {}, 0, time.time()
  # Folder datasets (tagged images, masks optional): image-level scores too (image_level.py).
  rows, masked = [] if dc.name == "folder" else None, 0
  drawn = set(dataset.indices[: ec.num_vis])  # The first num_vis of this process's slice.
  for ex, pred in predict(*args):
    count += 1
    if ex.get("mask") is not None:
      acc.add(pred, ex["mask"])
      masked += 1
    if rows is not None:
      rows.append(image_level_scores(task, frozen, ex, pred, target))
    if write_outputs and ec.save_png:
      png.save_label_png(pred_dir / f"{ex['id']}.png", pred.astype(np.uint8))
    if lead and ex["index"] in drawn:
      vis_images[f"{label}_{target}/{ex['id']}"] = vis_grid(
        task, frozen, variables, ex, pred, names, source=source
      )
  conf, count = _all_processes_sum(acc.conf, count)
  masked = _all_processes_sum(np.zeros((1, 1), np.int64), masked)[1]
  seconds = time.time() - t0
  res = metrics.scores(conf, names)
  res["masked_images"] = masked
  if not conf.sum():  # No mask at all: no pixel metric is defined.
    res.update(miou=None, pixel_accuracy=None, mean_accuracy=None)
  if rows is not None:
    res.update(image_level_results(rows, names))
  res.update(target=target, split=split, split_label=label, num_images=count)
  res.update(checkpoint_step=step, seconds=seconds)
  res.update(_protocol(ec, dc, target), clip_fingerprint=clip_fingerprint)
  if lead:
    print(f"\n{label} / {target} @ step {step}: {count} images in {seconds:.1f}s")
    if res["miou"] is not None:
      print(metrics.format_table(res))
    else:
      print(f"no mask among the {count} images: no pixel metric (image-level ones below)")
    if rows is not None:
      print(image_level.format_lines(res))
    title = f"{split} / {target} @ step {step}: rows ground truth, columns prediction, % of row"
    heatmap = visualize.confusion_heatmap(metrics.row_shares(conf), names, title=title)
    vis_images[confusion_key(label, target)] = heatmap
    if write_outputs:
      _write(res, vis_images, workdir, label, target)
  res["images"] = vis_images
  return res
