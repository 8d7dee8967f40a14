"""The training example contract both executors share (numpy in pipeline.py, tf.data in
pipeline_tf.py): which split index and augmentation draws each stream position gets, how one
example is decoded and augmented, and how examples become a batch.

A training batch (per host) is a dict of numpy arrays:
  image        uint8 [B, S, S, 3]  RGB; padding 0 (normalised on device, §1.1)
  labels       float32 [B, C-1]    image-level labels of the whole image (§1.1)
  superpixels  int32 [B, S, S]     superpixel ids, -1 on padding (§3.1)
  clusters     int32 [B, S, S]     colour-cluster ids of the superpixels (SGC target regions,
                                   §3.2), -1 on padding
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
"""

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from ssr_jax.data import augment, files
from ssr_jax.data.dataset import Split
from ssr_jax.data.files import DataError


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


@dataclasses.dataclass(frozen=True)
class TrainSource:
  """Everything an executor reads: the split, its superpixel and colour-cluster files,
  augmentation and order."""

  split: Split
  superpixel_paths: tuple[str, ...] | None  # Per split index; None = not read.
  cluster_paths: tuple[str, ...] | None  # Colour-cluster maps per split index; None = not read.
  augment: AugmentOptions
  order: Order
  positions: Callable[[int], range]  # Global step -> this host's stream positions.

  def draws(self, position: int) -> np.ndarray:
    """float64 [augment.NUM_DRAWS] uniforms of stream position g."""
    return augment.draws(self.order.seed, position)

  def example_files(self, index: int) -> tuple:
    """(image path, mask path, superpixel path or None, cluster path or None, num_classes)
    of split index i."""
    s = self.split
    sp_path = None if self.superpixel_paths is None else self.superpixel_paths[index]
    cl_path = None if self.cluster_paths is None else self.cluster_paths[index]
    return s.image_paths[index], s.mask_paths[index], sp_path, cl_path, s.num_classes


def load_example(source: TrainSource, position: int):
  """Decodes, validates and augments the example at stream position g (numpy).

  Returns (image uint8 [S, S, 3], mask uint8 [S, S], superpixels int32 [S, S], clusters int32
  [S, S]).
  """
  index = source.order(position)
  return load_files(*source.example_files(index), source.draws(position), source.augment)


def load_files(image_path, mask_path, sp_path, cl_path, num_classes, u, opts: AugmentOptions):
  """load_example on explicit paths (small, picklable arguments for worker processes).

  Without sp_path (cl_path) the superpixels (clusters) are the valid-region layout: 0 inside the
  image, -1 on padding.
  """
  image, mask, sp, cl = read_example(image_path, mask_path, sp_path, cl_path, num_classes)
  p = opts.plan(image.shape[0], image.shape[1], u)
  img, m, spo = augment.apply(image, mask, sp, p, ignore_label=opts.ignore_label)
  return img, m, spo, augment.resample_regions(cl, p)


def read_example(image_path, mask_path, sp_path, cl_path, num_classes):
  """Decodes one example at original size and checks that its maps match the image.

  Returns (image uint8 [H, W, 3], mask uint8 [H, W], superpixels int32 [H, W] or None when
  sp_path is None, colour clusters int32 [H, W] or None when cl_path is None).
  """
  image = files.read_image(image_path)
  mask = files.read_mask(mask_path, num_classes)
  _check_size(mask, image, mask_path, image_path)
  sp = cl = None
  if sp_path is not None:
    sp = files.read_superpixels(sp_path)
    _check_size(sp, image, sp_path, image_path)
  if cl_path is not None:
    cl = files.read_clusters(cl_path)
    _check_size(cl, image, cl_path, image_path)
  return image, mask, sp, cl


def _check_size(label, image, label_path, image_path):
  if label.shape != image.shape[:2]:
    raise DataError(
      f"{label_path} is {label.shape[0]}x{label.shape[1]} but image {image_path} is "
      f"{image.shape[0]}x{image.shape[1]} (H x W); they must match"
    )


def assemble(split: Split, indices, images, masks, sps, cls) -> dict:
  """The batch dict of the module docstring from per-example arrays."""
  idx = np.asarray(indices, np.int32)
  return {
    "image": np.stack(images),
    "labels": split.labels[idx],
    "superpixels": np.stack(sps).astype(np.int32),
    "clusters": np.stack(cls).astype(np.int32),
    "mask": np.stack(masks),
    "index": idx,
  }
