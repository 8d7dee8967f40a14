"""Input pipelines: datasets by name, the training batch iterator, per-image eval data.

A training batch (per host) is a dict of numpy arrays:
  image        uint8 [B, S, S, 3]  RGB; padding 0 (normalised on device, §1.1)
  labels       float32 [B, C-1]    image-level labels of the whole image (§1.1)
  superpixels  int32 [B, S, S]     superpixel ids, -1 on padding (§3.1)
  mask         uint8 [B, S, S]     ground truth, 255 ignore/padding (metrics only, never a loss)
  index        int32 [B]           index into the split
with S = data.crop_size and B = batch_size / process_count.

Determinism and resume: the example at global stream position g = step * batch_size + j is
split index perm_e[g mod N] with e = g div N and perm_e a permutation drawn from
numpy.random.default_rng([seed, 1, e]); its augmentation uses the uniforms
`augment.draws(seed, g)`. Both are pure functions of (seed, g), so an iterator started at
`start_step` yields exactly what a fresh one yields after start_step batches, without decoding
the skipped ones, and host p of P takes positions [p * B, (p + 1) * B) of each global batch.
(Every epoch is a full permutation of the split, so no shuffle buffer is involved.)

Two interchangeable pipelines with identical output (tests/data/test_pipeline.py):
- "tf": tf.data (parallel map, prefetch) in pipeline_tf.py; TensorFlow is imported only there.
- "numpy": a pool over examples (PIL decode, numpy augmentation); no TensorFlow anywhere in
  its import chain, for machines without it. data.worker_type "thread" (default) is GIL-bound
  at ~400 images/s whatever the core count; "process" (spawned workers) scales with cores.
"auto" picks tf when TensorFlow imports. Both decode JPEGs with libjpeg's accurate integer
DCT (PIL's default; TF told so) and run the same integer resampling plan (augment.py), so the
batches are bit-identical; colour jitter (off by default) uses float32 on both sides and may
differ by 1 grey level on rare pixels (its mean is a float reduction in a different order).

Superpixels: `superpixels=None` (auto) reads them when the superpixel folder exists; without
them the batch still carries the valid-region layout (0 inside the image, -1 on padding).
Training calls `superpixels.check_superpixels` first when SGC is on.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os

import numpy as np

from ssr_jax.data import augment, coco, files, parallel, synthetic, voc
from ssr_jax.data import superpixels as sp_lib
from ssr_jax.data.dataset import Dataset, Split
from ssr_jax.data.files import DataError

log = logging.getLogger(__name__)

PIPELINES = ("tf", "numpy")


def get_dataset(data_cfg) -> Dataset:
  """The dataset named by data.name (voc, coco, synthetic) at data.root."""
  readers = {"voc": voc, "coco": coco, "synthetic": synthetic}
  if data_cfg.name not in readers:
    raise ValueError(f"unknown data.name {data_cfg.name!r}; use one of {sorted(readers)}")
  ds = readers[data_cfg.name].open_dataset(data_cfg.root, labels_file=data_cfg.labels_file)
  if ds.num_classes != data_cfg.num_classes:
    raise DataError(
      f"data.num_classes is {data_cfg.num_classes} but the {ds.name} dataset at {ds.root} "
      f"has {ds.num_classes} classes (including background); fix the config"
    )
  return ds


def resolve_pipeline(name: str) -> str:
  """tf or numpy; "auto" is tf when TensorFlow can be imported."""
  if name in PIPELINES:
    return name
  if name != "auto":
    raise ValueError(f"unknown data.pipeline {name!r}; use tf, numpy or auto")
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    return "numpy"
  return "tf"


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """The §1.1 augmentation settings (from the data config)."""

  crop_size: int
  scale_range: tuple[float, float]
  hflip: bool
  color_jitter: float
  ignore_label: int

  @classmethod
  def from_config(cls, data_cfg):
    return cls(
      crop_size=int(data_cfg.crop_size),
      scale_range=tuple(float(s) for s in data_cfg.scale_range),
      hflip=bool(data_cfg.hflip),
      color_jitter=float(data_cfg.color_jitter),
      ignore_label=int(data_cfg.ignore_label),
    )

  def plan(self, height, width, u) -> augment.Plan:
    return augment.plan(
      height,
      width,
      u,
      crop_size=self.crop_size,
      scale_range=self.scale_range,
      hflip=self.hflip,
      color_jitter=self.color_jitter,
    )


class Order:
  """Split index of each global stream position: a fresh permutation every epoch."""

  def __init__(self, seed: int, n: int):
    self.seed, self.n = int(seed), int(n)
    self._perms = collections.OrderedDict()

  def _perm(self, epoch):
    if epoch not in self._perms:
      self._perms[epoch] = np.random.default_rng([self.seed, 1, epoch]).permutation(self.n)
      while len(self._perms) > 2:  # Positions only move forward.
        self._perms.popitem(last=False)
    return self._perms[epoch]

  def __call__(self, position: int) -> int:
    return int(self._perm(position // self.n)[position % self.n])


def host_positions(step: int, batch_size: int, process_index: int, process_count: int):
  """Global stream positions of this host's share of global batch `step`."""
  per_host = batch_size // process_count
  start = step * batch_size + process_index * per_host
  return range(start, start + per_host)


def load_example(split: Split, sp_paths, index: int, u, opts: AugmentOptions):
  """Decodes, validates and augments one training example (numpy) -> (image, mask, sp)."""
  sp_path = None if sp_paths is None else sp_paths[index]
  return load_files(
    split.image_paths[index], split.mask_paths[index], sp_path, split.num_classes, u, opts
  )


def load_files(image_path, mask_path, sp_path, num_classes, u, opts: AugmentOptions):
  """load_example on explicit paths (small, picklable arguments for worker processes)."""
  image = files.read_image(image_path)
  mask = files.read_mask(mask_path, num_classes)
  _check_size(mask, image, mask_path, image_path)
  sp = None
  if sp_path is not None:
    sp = files.read_superpixels(sp_path)
    _check_size(sp, image, sp_path, image_path)
  p = opts.plan(image.shape[0], image.shape[1], u)
  return augment.apply(image, mask, sp, p, ignore_label=opts.ignore_label)


def _check_size(label, image, label_path, image_path):
  if label.shape != image.shape[:2]:
    raise DataError(
      f"{label_path} is {label.shape[0]}x{label.shape[1]} but image {image_path} is "
      f"{image.shape[0]}x{image.shape[1]} (H x W); they must match"
    )


def assemble(split: Split, indices, images, masks, sps) -> dict:
  """The batch dict of the module docstring from per-example arrays."""
  idx = np.asarray(indices, np.int32)
  return {
    "image": np.stack(images),
    "labels": split.labels[idx],
    "superpixels": np.stack(sps).astype(np.int32),
    "mask": np.stack(masks),
    "index": idx,
  }


class TrainIterator:
  """Infinite iterator of training batches; `step` is the global step of the next batch."""

  def __init__(self, batches, step: int, pipeline: str, close=None):
    self._batches = batches
    self.step = step
    self.pipeline = pipeline
    self._close = close

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._batches)
    self.step += 1
    return batch

  def close(self):
    if self._close is not None:
      self._close()
      self._close = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _numpy_batches(
  split, sp_paths, opts, order, positions_of, start_step, workers, prefetch, worker_type
):
  if worker_type == "process" and parallel.main_is_importable():
    # Past the GIL: each task pickles only paths and draws; results are the small crops.
    ctx = multiprocessing.get_context("spawn")  # Not fork: JAX's threads make it unsafe.
    pool = concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=ctx)
  elif worker_type in ("thread", "process"):
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="ssr-data")
  else:
    raise ValueError(f"unknown data.worker_type {worker_type!r}; use thread or process")
  pending = collections.deque()

  def submit(step):
    futs = []
    for g in positions_of(step):
      i = order(g)
      sp_path = None if sp_paths is None else sp_paths[i]
      args = (
        split.image_paths[i],
        split.mask_paths[i],
        sp_path,
        split.num_classes,
        augment.draws(order.seed, g),
        opts,
      )
      futs.append((i, pool.submit(load_files, *args)))
    pending.append(futs)

  try:
    for s in range(start_step, start_step + prefetch + 1):
      submit(s)
    step = start_step
    while True:
      futs = pending.popleft()
      submit(step + prefetch + 1)
      out = [f.result() for _, f in futs]
      yield assemble(split, [i for i, _ in futs], *zip(*out))
      step += 1
  finally:
    for futs in pending:
      for _, f in futs:
        f.cancel()
    pool.shutdown(wait=False, cancel_futures=True)


def _superpixel_paths(data_cfg, split: Split, mode, split_name):
  """Per-image superpixel paths, or None when not used (mode None = use if the folder exists)."""
  if mode is False:
    return None
  d = sp_lib.directory(data_cfg, split.root)
  if mode is None and not os.path.isdir(d):
    log.info("no superpixel folder %s: batches carry the valid region only", d)
    return None
  if mode is True:
    sp_lib.check_superpixels(data_cfg, split_name)
  return split.superpixel_paths(d)


def make_train_iterator(
  data_cfg,
  *,
  batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  pipeline: str | None = None,
  superpixels: bool | None = None,
) -> TrainIterator:
  """Training batches of data.train_split for global steps start_step, start_step + 1, ...

  batch_size is the global batch; this host gets batch_size / process_count examples of each
  (process_index/process_count default to jax's). pipeline: tf, numpy or auto (default
  data.pipeline). superpixels: True = required (error naming the command that makes them if
  missing), False = not read, None = read when the folder exists.
  """
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  name = resolve_pipeline(pipeline or data_cfg.pipeline)
  split = get_dataset(data_cfg).split(
    data_cfg.train_split, drop_unlabeled=True, workers=data_cfg.num_workers
  )
  sp_paths = _superpixel_paths(data_cfg, split, superpixels, data_cfg.train_split)
  opts = AugmentOptions.from_config(data_cfg)
  order = Order(seed, len(split))

  def positions_of(step):
    return host_positions(step, batch_size, process_index, process_count)

  workers, prefetch = int(data_cfg.num_workers), int(data_cfg.prefetch)
  if name == "tf":
    from ssr_jax.data import pipeline_tf

    batches = pipeline_tf.batches(
      split, sp_paths, opts, order, positions_of, start_step, workers=workers, prefetch=prefetch
    )
  else:
    batches = _numpy_batches(
      split,
      sp_paths,
      opts,
      order,
      positions_of,
      start_step,
      workers,
      prefetch,
      data_cfg.worker_type,
    )
  log.info(
    "train input: %s pipeline, %s split (%d images), %d per host, from step %d",
    name,
    data_cfg.train_split,
    len(split),
    batch_size // process_count,
    start_step,
  )
  return TrainIterator(batches, start_step, name, close=batches.close)


# ------------------------------------------------------------------------------- evaluation


class EvalDataset:
  """Per-image examples of a split at original size (no augmentation).

  Item i is a dict: image uint8 [H, W, 3], mask uint8 [H, W] (255 ignore), labels float32
  [C-1], superpixels int32 [H, W] (zeros when not available), id str, index int.
  Iterating prefetches with a thread pool and keeps order.
  """

  def __init__(self, split: Split, sp_paths, *, max_images: int = 0, workers: int = 4):
    self.split = split
    self._sp_paths = sp_paths
    self._n = len(split) if max_images <= 0 else min(max_images, len(split))
    self._workers = max(1, workers)

  def __len__(self):
    return self._n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self._n:
      raise IndexError(i)
    s = self.split
    image = files.read_image(s.image_paths[i])
    mask = files.read_mask(s.mask_paths[i], s.num_classes)
    _check_size(mask, image, s.mask_paths[i], s.image_paths[i])
    if self._sp_paths is None:
      sp = np.zeros(mask.shape, np.int32)
    else:
      sp = files.read_superpixels(self._sp_paths[i])
      _check_size(sp, image, self._sp_paths[i], s.image_paths[i])
    return {
      "image": image,
      "mask": mask,
      "labels": s.labels[i],
      "superpixels": sp,
      "id": s.ids[i],
      "index": i,
    }

  def __iter__(self):
    with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
      window = collections.deque()
      for i in range(self._n):
        window.append(pool.submit(self.__getitem__, i))
        if len(window) > 2 * self._workers:
          yield window.popleft().result()
      while window:
        yield window.popleft().result()


def make_eval_dataset(
  data_cfg, split: str, *, max_images: int = 0, superpixels: bool | None = None
) -> EvalDataset:
  """Per-image data of a split (e.g. data.val_split, or "train" for pseudo-label quality).

  max_images > 0 keeps the first max_images images of the list. superpixels as in
  make_train_iterator.
  """
  s = get_dataset(data_cfg).split(split, workers=data_cfg.num_workers)
  sp_paths = _superpixel_paths(data_cfg, s, superpixels, split)
  return EvalDataset(s, sp_paths, max_images=max_images, workers=data_cfg.num_workers)
