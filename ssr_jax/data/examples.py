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
from typing import NamedTuple

import numpy as np

from ssr_jax.data import augment, files
from ssr_jax.data.dataset import Split


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


class Encoded(NamedTuple):
  """One example's encoded bytes, as stored in the folders and, unchanged, in a TFDS build."""

  image: bytes
  mask: bytes  # b"" = the image has no mask (folder datasets): all 255 (ignore).
  superpixels: bytes | None  # None = not read.
  clusters: bytes | None
  names: tuple[str, str, str, str]  # Where each came from, for errors.
  remedy: str = ""  # What to do about a bad one ("" = the folder source's advice).


@dataclasses.dataclass(frozen=True)
class FileRef:
  """Example files of the folder source (data.source = "files")."""

  image: str
  mask: str  # "" = no mask.
  superpixels: str | None = None
  clusters: str | None = None

  def fetch(self) -> Encoded:
    maybe = lambda p, kind: None if p is None else files.read_kind(p, kind)
    return Encoded(
      files.read_kind(self.image, "image"),
      files.read_kind(self.mask, "mask") if self.mask else b"",
      maybe(self.superpixels, "superpixel"),
      maybe(self.clusters, "colour-cluster"),
      (
        f"image {self.image}",
        f"mask {self.mask}",
        f"superpixel file {self.superpixels}",
        f"colour-cluster file {self.clusters}",
      ),
    )


@dataclasses.dataclass(frozen=True)
class FileStore:
  """Split index -> FileRef: the split's files and, when read, its superpixel/cluster maps."""

  split: Split
  superpixel_paths: tuple[str, ...] | None = None  # Per split index; None = not read.
  cluster_paths: tuple[str, ...] | None = None

  def ref(self, index: int) -> FileRef:
    s, sp, cl = self.split, self.superpixel_paths, self.cluster_paths
    return FileRef(
      s.image_paths[index],
      s.mask_paths[index],
      None if sp is None else sp[index],
      None if cl is None else cl[index],
    )


def decode_example(enc: Encoded, num_classes: int):
  """Decodes one example at original size and checks that its maps match the image.

  Returns (image uint8 [H, W, 3], mask uint8 [H, W] (all 255 when the example has none),
  superpixels int32 [H, W] or None when not read, colour clusters int32 [H, W] or None when not
  read).
  """
  names, fix = enc.names, enc.remedy
  image = files.decode_image(enc.image, names[0], fix)
  if enc.mask:
    mask = files.decode_mask(enc.mask, num_classes, names[1], fix)
    files.check_same_size(mask.shape, image.shape[:2], names[1], names[0])
  else:
    mask = np.full(image.shape[:2], files.IGNORE, np.uint8)
  sp = cl = None
  if enc.superpixels is not None:
    sp = files.decode_superpixels(enc.superpixels, names[2], fix)
    files.check_same_size(sp.shape, image.shape[:2], names[2], names[0])
  if enc.clusters is not None:
    cl = files.decode_clusters(enc.clusters, names[3], fix)
    files.check_same_size(cl.shape, image.shape[:2], names[3], names[0])
  return image, mask, sp, cl


@dataclasses.dataclass(frozen=True)
class TrainSource:
  """Everything an executor reads: the split, where its examples' bytes come from (a FileStore
  or a records.RecordStore), augmentation and order."""

  split: Split
  store: object  # .ref(split index) -> a FileRef or records.RecordRef (picklable, .fetch()).
  augment: AugmentOptions
  order: Order
  positions: Callable[[int], range]  # Global step -> this host's stream positions.

  def draws(self, position: int) -> np.ndarray:
    """float64 [augment.NUM_DRAWS] uniforms of stream position g."""
    return augment.draws(self.order.seed, position)


def load_example(source: TrainSource, position: int):
  """Decodes, validates and augments the example at stream position g (numpy).

  Returns (image uint8 [S, S, 3], mask uint8 [S, S], superpixels int32 [S, S], clusters int32
  [S, S]).
  """
  ref = source.store.ref(source.order(position))
  return load_ref(ref, source.split.num_classes, source.draws(position), source.augment)


def load_ref(ref, num_classes, u, opts: AugmentOptions):
  """load_example on an example reference (small, picklable arguments for worker processes).

  Without superpixels (clusters) the maps are the valid-region layout: 0 inside the image, -1
  on padding.
  """
  image, mask, sp, cl = decode_example(ref.fetch(), num_classes)
  p = opts.plan(image.shape[0], image.shape[1], u)
  img, m, spo = augment.apply(image, mask, sp, p, ignore_label=opts.ignore_label)
  return img, m, spo, augment.resample_regions(cl, p)


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
