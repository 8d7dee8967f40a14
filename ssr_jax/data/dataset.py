"""Dataset-independent records: a split is parallel lists of ids, image and mask paths, labels.

`Dataset` (one per reader: voc.py, coco.py, synthetic.py) maps a split name to its files;
`Dataset.split()` checks them, derives image-level labels and returns a `Split`, which is all
the input pipelines read. Image-level labels are the foreground classes present in the ground
truth mask of the whole image (§1.1: mask values minus {0, 255}), read from a labels file when
one is given (COCO's converter and the synthetic writer produce one), else computed from the
masks, which also validates every mask's values and size against its image.
"""

import concurrent.futures
import dataclasses
import logging
from collections.abc import Callable

import numpy as np
from etils import epath

from ssr_jax.data import files
from ssr_jax.data.files import DataError

log = logging.getLogger(__name__)

MAX_LISTED = 10  # Problems listed by name in one error message.


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: N images with their paths and [N, C-1] multi-hot image-level labels.

  A mask path "" means the image has no mask (folder datasets): it reads as all 255 (ignore).
  """

  dataset: str  # voc, coco or synthetic.
  name: str
  root: str
  ids: tuple[str, ...]
  image_paths: tuple[str, ...]
  mask_paths: tuple[str, ...]
  labels: np.ndarray  # float32 [N, C-1]: fg class c (mask value c+1) present in the image.
  num_classes: int  # Including background.

  def __len__(self):
    return len(self.ids)

  def superpixel_paths(self, directory: str) -> tuple[str, ...]:
    """Where the precomputed superpixel PNG of each image lives under `directory`."""
    d = epath.Path(directory)
    return tuple(str(d / f"{i}.png") for i in self.ids)


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """What a reader resolves a split name to."""

  ids: list[str]
  images: list[str]
  masks: list[str]
  list_file: str  # The file the ids came from (named in errors).
  labels_file: str = ""  # "id v1 v2 ..." lines (mask values); "" = compute from the masks.
  labels: np.ndarray | None = None  # float32 [N, C-1] given by the reader (folder), else None.


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset on disk: names, class count and a split-name -> files resolver."""

  name: str
  root: str
  num_classes: int
  class_names: tuple[str, ...]  # Foreground names, mask value c+1 for class_names[c].
  manual: str  # What goes where, quoted in every error about missing files.
  resolve: Callable[[str], SplitFiles]  # Split name -> its files.
  # Background names for the CAM softmax (§1.2) when the dataset defines them (synthetic,
  # folder); VOC/COCO leave them to c.model.bg_names.
  bg_names: tuple[str, ...] = ()
  # CLIP prompt names of the classes (synonyms comma-separated, §1.2) when the dataset defines
  # them (folder); () = c.model.class_names.
  prompts: tuple[str, ...] = ()

  def split(self, name: str, *, drop_unlabeled: bool = False, workers: int = 8) -> Split:
    """Checks a split's files exist, attaches image-level labels, returns the Split.

    drop_unlabeled: drop images whose mask has no foreground class (training needs >= 1
    label per image); the count is logged.
    """
    sf = self.resolve(name)
    ids, images, masks = sf.ids, sf.images, sf.masks
    if not ids:
      raise DataError(f"split {name!r} of {self.name} at {self.root} is empty ({sf.list_file})")
    _check_exist(images, masks, name, sf.list_file, self.manual)
    if sf.labels is not None:
      labels = np.asarray(sf.labels, np.float32)
    elif sf.labels_file:
      labels = read_labels_file(sf.labels_file, ids, self.num_classes)
    else:
      labels = labels_from_masks(images, masks, self.num_classes, workers=workers)
    split = Split(
      dataset=self.name,
      name=name,
      root=self.root,
      ids=tuple(ids),
      image_paths=tuple(images),
      mask_paths=tuple(masks),
      labels=labels,
      num_classes=self.num_classes,
    )
    if drop_unlabeled:
      split = drop_unlabeled_images(split)
    return split


def _is_file(path) -> bool:
  return epath.Path(path).is_file()


def _check_exist(images, masks, split, list_file, manual):
  paths = [*images, *(m for m in masks if m)]  # "" = no mask (folder datasets).
  missing = missing_files(paths)
  if missing:
    raise DataError(missing_summary(missing, images, where(split, list_file), manual))


def where(split: str, list_file: str) -> str:
  """How errors name a split: its list file, or its name and list file."""
  return list_file if split == list_file else f"split {split!r} ({list_file})"


def missing_files(paths) -> list[str]:
  """The paths that are not files, in order."""
  # Threads: on gs:// every check is a round trip to the object store.
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return [p for p, ok in zip(paths, pool.map(_is_file, paths)) if not ok]


def missing_summary(missing, images, where: str, manual: str) -> str:
  """One message for the files a split list names that do not exist (`missing`, among its
  `images` and their masks): the counts, the first MAX_LISTED names and the likely cause."""
  in_images = set(images)
  n_img = sum(p in in_images for p in missing)
  counts = [f"{n_img} of {len(images)} images"] if n_img else []
  counts += [f"{len(missing) - n_img} masks"] if len(missing) > n_img else []
  listed = "\n  ".join(missing[:MAX_LISTED])
  head = f"{' and '.join(counts)} named by {where} are missing, e.g.\n  {listed}\n"
  if 0 < n_img < len(images):
    return head + (
      "Likely cause: the list names images your data.root does not have (part of the dataset?): "
      "pass your own list of the images you have with --config.data.train_split=PATH (and "
      "--config.data.val_split=PATH; README: 'Subsets and your own split lists')"
    )
  if n_img:
    return head + f"Likely cause: data.root holds none of the listed images.\n{manual}"
  return head + f"Likely cause: the masks are not where the dataset keeps them.\n{manual}"


def drop_unlabeled_images(split: Split) -> Split:
  """The split without images whose labels are all zero (the count is logged)."""
  keep = split.labels.sum(1) > 0
  dropped = int((~keep).sum())
  if not dropped:
    return split
  log.warning(
    "split %s: skipping %d of %d images with no foreground label",
    split.name,
    dropped,
    len(split),
  )
  if not keep.any():
    raise DataError(f"split {split.name!r} at {split.root}: no image has a foreground label")
  pick = lambda xs: tuple(x for x, k in zip(xs, keep) if k)
  return dataclasses.replace(
    split,
    ids=pick(split.ids),
    image_paths=pick(split.image_paths),
    mask_paths=pick(split.mask_paths),
    labels=split.labels[keep],
  )


def mask_labels(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 [C-1] multi-hot of the foreground values present in a mask (§1.1)."""
  present = np.bincount(mask.ravel(), minlength=256)[1:num_classes] > 0
  return present.astype(np.float32)


def _scan_one(image_path, mask_path, num_classes):
  """(labels, problem or None) for one image: mask values, mask size vs image size."""
  try:
    mask = files.read_mask(mask_path, num_classes)
    files.check_same_size(
      mask.shape, files.image_size(image_path), f"mask {mask_path}", f"image {image_path}"
    )
    return mask_labels(mask, num_classes), None
  except DataError as e:
    return np.zeros(num_classes - 1, np.float32), str(e)


def labels_from_masks(images, masks, num_classes: int, *, workers: int = 8) -> np.ndarray:
  """float32 [N, C-1] image labels from the masks; raises one DataError listing all problems."""
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    results = list(pool.map(_scan_one, images, masks, [num_classes] * len(masks)))
  problems = [p for _, p in results if p is not None]
  if problems:
    listed = "\n  ".join(problems[:MAX_LISTED])
    raise DataError(f"{len(problems)} bad mask(s):\n  {listed}")
  return np.stack([lab for lab, _ in results]).astype(np.float32)


def read_labels_file(path: str, ids, num_classes: int) -> np.ndarray:
  """float32 [N, C-1] labels for `ids` from lines "id v1 v2 ..." (v = mask values 1..C-1)."""
  table = {}
  try:
    with epath.Path(path).open() as f:
      for lineno, line in enumerate(f, 1):
        parts = line.split()
        if not parts:
          continue
        try:
          vals = [int(v) for v in parts[1:]]
        except ValueError:
          raise DataError(f"{path}:{lineno}: expected 'id v1 v2 ...' with integer values") from None
        if any(v < 1 or v >= num_classes for v in vals):
          raise DataError(f"{path}:{lineno}: class values must be in 1..{num_classes - 1}")
        table[parts[0]] = vals
  except FileNotFoundError:
    raise DataError(
      f"labels file not found: {path} (set data.labels_file or leave it empty)"
    ) from None
  missing = [i for i in ids if i not in table]
  if missing:
    raise DataError(f"labels file {path} has no line for {len(missing)} id(s), e.g. {missing[:5]}")
  return labels_from_values([table[i] for i in ids], num_classes)


def labels_from_values(values, num_classes: int) -> np.ndarray:
  """float32 [N, C-1] multi-hot labels from each image's foreground mask values (1..C-1)."""
  out = np.zeros((len(values), num_classes - 1), np.float32)
  for n, v in enumerate(values):
    out[n, np.asarray(v, np.int64) - 1] = 1.0
  return out


def label_values(labels: np.ndarray) -> list[list[int]]:
  """Each image's foreground mask values from float32 [N, C-1] labels (labels_from_values's
  inverse)."""
  return [(np.flatnonzero(row) + 1).tolist() for row in labels]


def write_labels_file(path: str, ids, labels: np.ndarray) -> None:
  """Writes labels [N, C-1] as lines "id v1 v2 ..." (mask values), readable by read_labels_file."""
  lines = [
    " ".join([i] + [str(v) for v in vals]) + "\n" for i, vals in zip(ids, label_values(labels))
  ]
  files.write_bytes(path, "".join(lines).encode())  # Atomic, local or gs://.


def read_list(path: str) -> list[str]:
  """Ids from a split list file (one per line; extra columns ignored)."""
  try:
    return [line.split()[0] for line in epath.Path(path).read_text().splitlines() if line.strip()]
  except FileNotFoundError:
    raise DataError(f"split list not found: {path}") from None
