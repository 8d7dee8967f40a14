"""Input pipelines: the training batch iterator and per-image eval data.

`make_train_iterator` yields the training batches described in examples.py (layout,
determinism, resume, per-host slices) from one of two interchangeable executors with identical
output (tests/data/test_pipeline.py):
- "tf": tf.data (parallel map, prefetch) in pipeline_tf.py; TensorFlow is imported only there.
- "numpy": a pool over examples (PIL decode, numpy augmentation) in this file; no TensorFlow
  anywhere in its import chain, for machines without it. data.worker_type "thread" (default)
  is GIL-bound at ~400 images/s whatever the core count; "process" (spawned workers) scales
  with cores.
"auto" picks tf when TensorFlow imports. Both decode JPEGs with libjpeg's accurate integer
DCT (PIL's default; TF told so) and run the same integer resampling plan (augment.py), so the
batches are bit-identical; colour jitter (off by default) uses float32 on both sides and may
differ by 1 grey level on rare pixels (its mean is a float reduction in a different order).

Superpixels: the caller says whether they are needed (`superpixels=True` when SGC uses them).
Then every image of the split must have its file, checked at start-up: a DataError names the
missing folder or file and the command that makes them. With `superpixels=False` none is read;
training batches carry the valid-region layout (0 inside the image, -1 on padding) and eval
items zeros. The same holds for the colour clusters (SGC's target regions, `clusters=True`;
batch key "clusters"), which live beside the superpixels and are checked the same way: a
superpixel folder made before colour clusters existed is refused with the command that adds them.

Bad files: `open_train_source` checks every example of the training split before the first
batch (data.verify, data/check.py) and names every bad file in one DataError, rather than
stopping at whichever step first reads one.
"""

import collections
import concurrent.futures
import functools
import logging
from collections.abc import Iterator

import numpy as np

from ssr_jax.data import check, files, parallel, sources
from ssr_jax.data.dataset import Split
from ssr_jax.data.examples import (
  AugmentOptions,
  Order,
  TrainSource,
  assemble,
  decode_example,
  host_positions,
  load_ref,
)

log = logging.getLogger(__name__)

PIPELINES = ("tf", "numpy")


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


def _numpy_batches(source: TrainSource, start_step, *, workers, prefetch, worker_type):
  if worker_type == "process" and parallel.main_is_importable():
    # Past the GIL: each task pickles only paths and draws; results are the small crops.
    pool = parallel.process_pool(max(1, workers))
  elif worker_type in ("thread", "process"):
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="ssr-data")
  else:
    raise ValueError(f"unknown data.worker_type {worker_type!r}; use thread or process")
  pending = collections.deque()

  def submit(step):
    futs = []
    for g in source.positions(step):
      i = source.order(g)
      args = (source.store.ref(i), source.split.num_classes, source.draws(g), source.augment)
      futs.append((i, pool.submit(load_ref, *args)))
    pending.append(futs)

  try:
    for s in range(start_step, start_step + prefetch + 1):
      submit(s)
    step = start_step
    while True:
      futs = pending.popleft()
      submit(step + prefetch + 1)
      out = [f.result() for _, f in futs]
      yield assemble(source.split, [i for i, _ in futs], *zip(*out))
      step += 1
  finally:
    for futs in pending:
      for _, f in futs:
        f.cancel()
    pool.shutdown(wait=False, cancel_futures=True)


def open_train_source(
  data_cfg,
  *,
  batch_size: int,
  seed: int,
  superpixels: bool,
  clusters: bool = False,
  process_index: int | None = None,
  process_count: int | None = None,
) -> TrainSource:
  """What the training batches of data.train_split are made from, checked at data.verify.

  batch_size is the global batch; this host gets batch_size / process_count examples of each
  (process_index/process_count default to jax's). superpixels: whether to read them (SGC on); if
  so, missing files raise a DataError here naming the folder and the command that makes them.
  clusters: the same for the colour clusters (SGC target regions). Every process checks every
  example (data/check.verify_split), so all of them stop together on a bad file.
  """
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  split, store = sources.open_split(
    data_cfg, data_cfg.train_split, superpixels=superpixels, clusters=clusters, drop_unlabeled=True
  )
  check.verify_split(
    split, store, level=data_cfg.verify, workers=max(data_cfg.num_workers, parallel.usable_cpus())
  )
  return TrainSource(
    split=split,
    store=store,
    augment=AugmentOptions.from_config(data_cfg),
    order=Order(seed, len(split)),
    positions=functools.partial(
      host_positions,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
    ),
  )


def train_iterator(
  data_cfg, source: TrainSource, *, start_step: int = 0, pipeline: str | None = None
) -> TrainIterator:
  """Training batches of an open_train_source for global steps start_step, start_step + 1, ...

  pipeline: tf, numpy or auto (default data.pipeline); data.num_workers, prefetch and
  worker_type set the executor.
  """
  name = resolve_pipeline(pipeline or data_cfg.pipeline)
  workers, prefetch = int(data_cfg.num_workers), int(data_cfg.prefetch)
  if name == "tf":
    from ssr_jax.data import pipeline_tf  # Late: it imports TensorFlow.

    batches = pipeline_tf.batches(source, start_step, workers=workers, prefetch=prefetch)
  else:
    batches = _numpy_batches(
      source, start_step, workers=workers, prefetch=prefetch, worker_type=data_cfg.worker_type
    )
  log.info(
    "train input: %s pipeline from %s, %s split (%d images), %d per host, from step %d",
    name,
    data_cfg.source,
    data_cfg.train_split,
    len(source.split),
    len(source.positions(0)),
    start_step,
  )
  return TrainIterator(batches, start_step, name, close=batches.close)


def make_train_iterator(
  data_cfg,
  *,
  batch_size: int,
  seed: int,
  superpixels: bool,
  clusters: bool = False,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  pipeline: str | None = None,
) -> TrainIterator:
  """train_iterator of open_train_source (see both for the arguments)."""
  source = open_train_source(
    data_cfg,
    batch_size=batch_size,
    seed=seed,
    superpixels=superpixels,
    clusters=clusters,
    process_index=process_index,
    process_count=process_count,
  )
  return train_iterator(data_cfg, source, start_step=start_step, pipeline=pipeline)


# ------------------------------------------------------------------------------- evaluation


class EvalDataset:
  """Per-image examples of a split at original size (no augmentation).

  Item i is a dict: image uint8 [H, W, 3], mask uint8 [H, W] (255 ignore; None when the image
  has none, as in folder datasets), labels float32
  [C-1], superpixels and clusters int32 [H, W] (zeros when not read), id str, index int (into
  the split).
  `indices` are the split indices this dataset holds, in order. Iterating prefetches with a
  thread pool and keeps order.
  """

  def __init__(self, split: Split, store, *, indices, workers: int = 4):
    self.split = split
    self._store = store
    self.indices = tuple(int(i) for i in indices)
    self._workers = max(1, workers)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < len(self.indices):
      raise IndexError(i)
    s, k = self.split, self.indices[i]
    enc = self._store.ref(k).fetch()
    image, mask, sp, cl = decode_example(enc, s.num_classes)
    return {
      "image": image,
      "mask": mask if enc.mask else None,
      "labels": s.labels[k],
      "superpixels": np.zeros(mask.shape, np.int32) if sp is None else sp,
      "clusters": np.zeros(mask.shape, np.int32) if cl is None else cl,
      "id": s.ids[k],
      "index": k,
    }

  def __iter__(self):
    return self.iterate(range(len(self)))

  def iterate(self, positions) -> Iterator[dict]:
    """Items at `positions` (into this dataset), in that order, prefetched by a thread pool."""
    with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
      window = collections.deque()
      for i in positions:
        window.append(pool.submit(self.__getitem__, i))
        if len(window) > 2 * self._workers:
          yield window.popleft().result()
      while window:
        yield window.popleft().result()

  def image_sizes(self) -> list[tuple[int, int]]:
    """(H, W) of each item's image from its file header (no decode; the bytes are fetched)."""

    def size(k):
      enc = self._store.ref(k).fetch()
      return files.encoded_image_size(enc.image, enc.names[0])

    with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
      return list(pool.map(size, self.indices))


def make_eval_dataset(
  data_cfg,
  split: str,
  *,
  superpixels: bool,
  clusters: bool = False,
  max_images: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> EvalDataset:
  """Per-image data of a split (e.g. data.val_split, or "train" for pseudo-label quality).

  max_images > 0 keeps the first max_images images of the list. Host p of P then takes every
  P-th of those from the p-th (split indices p, p + P, ...): disjoint, together all of them.
  superpixels and clusters as in make_train_iterator (the `pseudo` target with SGC on needs
  them).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  s, store = sources.open_split(data_cfg, split, superpixels=superpixels, clusters=clusters)
  n = len(s) if max_images <= 0 else min(max_images, len(s))
  return EvalDataset(
    s, store, indices=range(process_index, n, process_count), workers=data_cfg.num_workers
  )
