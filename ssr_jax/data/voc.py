"""PASCAL VOC 2012 with the SBD-augmented masks (train_aug 10,582 / val 1,449 / train 1,464).

Reader over the extracted folders (no TFDS builder: tensorflow-datasets' voc/2012 has no
segmentation masks and its manual mode wants the original archives, environment.md pitfall 4).
The split lists are WeCLIP's, shipped as package data in ssr_jax/data/splits/voc/; the counts
are checked. Both input pipelines read the files listed by `open_dataset(...).split(name)`.
"""

import os

from etils import epath

from ssr_jax.data import dataset
from ssr_jax.data.files import DataError

CLASSES = (
  "aeroplane",
  "bicycle",
  "bird",
  "boat",
  "bottle",
  "bus",
  "car",
  "cat",
  "chair",
  "cow",
  "diningtable",
  "dog",
  "horse",
  "motorbike",
  "person",
  "pottedplant",
  "sheep",
  "sofa",
  "train",
  "tvmonitor",
)
NUM_CLASSES = 21
SPLIT_SIZES = {"train_aug": 10582, "val": 1449, "train": 1464}
SPLIT_DIR = os.path.join(os.path.dirname(__file__), "splits", "voc")

MANUAL = """\
PASCAL VOC 2012 + SBD augmented masks. data.root must be VOCdevkit/VOC2012 (or the VOCdevkit/
folder that contains VOC2012/) laid out as:
  JPEGImages/<id>.jpg              17,125 JPEGs from VOCtrainval_11-May-2012.tar
  SegmentationClassAug/<id>.png    12,031 single-channel PNGs (0 background, 1..20 classes,
                                   255 ignore): the SBD-augmented masks ("SegmentationClassAug.zip",
                                   the same files WeCLIP/ToCo/AFA use), unzipped into VOC2012/
(SegmentationClass/ from the VOC tar is used instead when SegmentationClassAug/ is absent; it
only covers train and val.) The split lists ship with ssr_jax: ssr_jax/data/splits/voc/
{train_aug,val,train}.txt (10,582 / 1,449 / 1,464 ids); data.train_split may also be a path to
your own list file. Check the result with: python -m ssr_jax.data.check --config configs/voc.py"""


def resolve_root(root: str) -> str:
  """The VOC2012 folder, given it or the VOCdevkit folder above it."""
  if not root:
    raise DataError(f"data.root is empty; set it to your VOC folder.\n{MANUAL}")
  for cand in (root, str(epath.Path(root) / "VOC2012")):
    if (epath.Path(cand) / "JPEGImages").is_dir():
      return cand
  raise DataError(f"no JPEGImages/ under {root} or {epath.Path(root) / 'VOC2012'}.\n{MANUAL}")


def split_file(split: str) -> str:
  """The list file of a named split (train_aug, val, train) or `split` itself if it is a file."""
  if split.endswith(".txt") or os.sep in split:
    return split
  path = os.path.join(SPLIT_DIR, f"{split}.txt")
  if not epath.Path(path).is_file():
    raise DataError(
      f"unknown VOC split {split!r}; use one of {sorted(SPLIT_SIZES)} or a path to a list file"
    )
  return path


def open_dataset(root: str, *, labels_file: str = "") -> dataset.Dataset:
  """The VOC dataset at root (VOCdevkit/ or VOCdevkit/VOC2012/)."""
  voc = resolve_root(root)
  top = epath.Path(voc)
  mask_dir = top / "SegmentationClassAug"
  if not mask_dir.is_dir():
    mask_dir = top / "SegmentationClass"

  def resolve(split):
    path = split_file(split)
    ids = dataset.read_list(path)
    want = SPLIT_SIZES.get(split)
    if want is not None and len(ids) != want:
      raise DataError(f"{path} lists {len(ids)} ids, expected {want} for VOC {split}")
    images = [str(top / "JPEGImages" / f"{i}.jpg") for i in ids]
    masks = [str(mask_dir / f"{i}.png") for i in ids]
    return dataset.SplitFiles(ids, images, masks, path, labels_file)

  return dataset.Dataset(
    name="voc",
    root=voc,
    num_classes=NUM_CLASSES,
    class_names=CLASSES,
    manual=MANUAL,
    resolve=resolve,
  )
