"""MS COCO 2014 as semantic segmentation: one-time conversion of the instance annotations, reader.

Conversion (`python -m ssr_jax.data.coco --root COCO --out OUT [--workers N]`), from
COCO/annotations/instances_{train,val}2014.json and the images in COCO/{train,val}2014/:
- Category ids map to mask values 1..80 in increasing category-id order (the standard 80-class
  order); 0 is background, 255 ignore.
- Crowd regions (iscrowd=1) are painted 255 first; object instances are then painted over them
  in decreasing area, so where instances overlap the smaller one wins (small objects lying on
  large ones, e.g. a cup on a table, stay visible) and objects win over crowd regions.
- Image-level labels are the classes left in the final mask (§1.1: a class only present as a
  crowd, or fully covered by smaller objects, is not a label). Images with no label are left
  out of the split list: WeCLIP's lists have 82,081 train and 40,137 val images.
- Polygons and RLEs are decoded with pycocotools (pinned in requirements.txt).
Output (data.root = OUT):
  OUT/JPEGImages/{train2014,val2014}        symlinks to COCO/{train2014,val2014}
  OUT/SegmentationClass/{train2014,val2014}/<id>.png   uint8 masks, <id> = file name stem
  OUT/ImageSets/{train,val}.txt             split lists
  OUT/ImageLabels/{train,val}.txt           "id v1 v2 ..." (mask values), read as the labels
  OUT/classes.txt                           the 80 category names in mask-value order
The conversion is parallel over processes, shows a progress bar and is resumable: masks already
written (atomically) are kept, only their labels are re-read.
"""

import argparse
import concurrent.futures
import json
import logging
import os
import sys

import numpy as np
from etils import epath

from ssr_jax.data import dataset, files, parallel
from ssr_jax.data.files import DataError

log = logging.getLogger(__name__)

# The 80 COCO-2014 thing classes in category-id order (ids 1..90 with gaps -> mask values
# 1..80), as WeCLIP's masks and our conversion number them (for tools with no data root).
CLASSES = (
  "person",
  "bicycle",
  "car",
  "motorcycle",
  "airplane",
  "bus",
  "train",
  "truck",
  "boat",
  "traffic light",
  "fire hydrant",
  "stop sign",
  "parking meter",
  "bench",
  "bird",
  "cat",
  "dog",
  "horse",
  "sheep",
  "cow",
  "elephant",
  "bear",
  "zebra",
  "giraffe",
  "backpack",
  "umbrella",
  "handbag",
  "tie",
  "suitcase",
  "frisbee",
  "skis",
  "snowboard",
  "sports ball",
  "kite",
  "baseball bat",
  "baseball glove",
  "skateboard",
  "surfboard",
  "tennis racket",
  "bottle",
  "wine glass",
  "cup",
  "fork",
  "knife",
  "spoon",
  "bowl",
  "banana",
  "apple",
  "sandwich",
  "orange",
  "broccoli",
  "carrot",
  "hot dog",
  "pizza",
  "donut",
  "cake",
  "chair",
  "couch",
  "potted plant",
  "bed",
  "dining table",
  "toilet",
  "tv",
  "laptop",
  "mouse",
  "remote",
  "keyboard",
  "cell phone",
  "microwave",
  "oven",
  "toaster",
  "sink",
  "refrigerator",
  "book",
  "clock",
  "vase",
  "scissors",
  "teddy bear",
  "hair drier",
  "toothbrush",
)
NUM_CLASSES = 81
YEAR_DIRS = {"train": "train2014", "val": "val2014"}
EXPECTED = {"train": 82081, "val": 40137}

MANUAL = """\
COCO 2014 must be converted once to semantic masks:
  python -m ssr_jax.data.coco --root COCO --out OUT
where COCO holds train2014/, val2014/ (the JPEGs of train2014.zip, val2014.zip) and
annotations/instances_{train,val}2014.json (annotations_trainval2014.zip). Then set
data.root=OUT. OUT gets JPEGImages/ (symlinks), SegmentationClass/, ImageSets/{train,val}.txt
(82,081 / 40,137 ids), ImageLabels/ and classes.txt. Check with:
  python -m ssr_jax.data.check --config configs/coco.py --config.data.root=OUT"""


def _split_name(split: str) -> str:
  for name, year in YEAR_DIRS.items():
    if split in (name, year):
      return name
  raise DataError(f"unknown COCO split {split!r}; use train or val")


def open_dataset(root: str, *, labels_file: str = "") -> dataset.Dataset:
  """The converted COCO dataset at root (the --out folder of the conversion)."""
  if not root or not (epath.Path(root) / "classes.txt").is_file():
    raise DataError(f"{root or 'data.root (empty)'} is not a converted COCO folder.\n{MANUAL}")
  top = epath.Path(root)
  text = (top / "classes.txt").read_text()
  names = tuple(line.strip() for line in text.splitlines() if line.strip())
  if len(names) != NUM_CLASSES - 1:
    raise DataError(f"{root}/classes.txt lists {len(names)} classes, expected 80; reconvert")

  def resolve(split):
    name = _split_name(split)
    year = YEAR_DIRS[name]
    path = str(top / "ImageSets" / f"{name}.txt")
    ids = dataset.read_list(path)
    images = [str(top / "JPEGImages" / year / f"{i}.jpg") for i in ids]
    masks = [str(top / "SegmentationClass" / year / f"{i}.png") for i in ids]
    labels = labels_file or str(top / "ImageLabels" / f"{name}.txt")
    return dataset.SplitFiles(ids, images, masks, path, labels)

  return dataset.Dataset(
    name="coco",
    root=root,
    num_classes=NUM_CLASSES,
    class_names=names,
    manual=MANUAL,
    resolve=resolve,
  )


# ---------------------------------------------------------------------------------- conversion


def category_values(categories) -> dict[int, int]:
  """COCO category id -> mask value 1..len, in increasing category-id order."""
  return {c["id"]: v for v, c in enumerate(sorted(categories, key=lambda c: c["id"]), 1)}


def _decode(segmentation, height, width) -> np.ndarray:
  """bool [H, W] of one annotation's polygons / RLE (pycocotools)."""
  from pycocotools import mask as mask_utils  # Only the one-time conversion needs it.

  if isinstance(segmentation, list):  # Polygons.
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  elif isinstance(segmentation.get("counts"), list):  # Uncompressed RLE.
    rle = mask_utils.frPyObjects(segmentation, height, width)
  else:  # Compressed RLE.
    rle = segmentation
  return mask_utils.decode(rle).astype(bool)


def render_mask(annotations, height: int, width: int, values: dict[int, int]) -> np.ndarray:
  """uint8 [H, W] semantic mask of one image's annotations (rules in the module docstring)."""
  mask = np.zeros((height, width), np.uint8)
  for ann in annotations:
    if ann.get("iscrowd", 0):
      mask[_decode(ann["segmentation"], height, width)] = files.IGNORE
  objects = [a for a in annotations if not a.get("iscrowd", 0)]
  objects.sort(key=lambda a: (-float(a.get("area", 0.0)), a.get("id", 0)))  # Large first.
  for ann in objects:
    mask[_decode(ann["segmentation"], height, width)] = values[ann["category_id"]]
  return mask


def _convert_one(task):
  """Writes one mask (unless a valid one exists); returns (id, labels as mask values)."""
  image_id, out_path, height, width, annotations, values = task
  if epath.Path(out_path).is_file():
    try:
      mask = files.read_mask(out_path, NUM_CLASSES)
      if mask.shape == (height, width):
        return image_id, _present(mask)
    except DataError:
      pass  # Rewrite a corrupt file.
  mask = render_mask(annotations, height, width, values)
  files.write_png(out_path, mask)
  return image_id, _present(mask)


def _present(mask):
  vals = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[1:NUM_CLASSES]) + 1
  return [int(v) for v in vals]


def convert_split(root: str, out: str, split: str, *, workers: int = 0, progress=True) -> int:
  """Converts one split (train or val); returns the number of images with labels."""
  year = YEAR_DIRS[split]
  ann_path = epath.Path(root) / "annotations" / f"instances_{year}.json"
  if not ann_path.is_file():
    raise DataError(f"annotation file not found: {ann_path}\n{MANUAL}")
  image_dir = epath.Path(root) / year
  if not image_dir.is_dir():
    raise DataError(f"image folder not found: {image_dir}\n{MANUAL}")
  log.info("reading %s", ann_path)
  with ann_path.open() as f:
    coco = json.load(f)
  values = category_values(coco["categories"])
  names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
  by_image = {}
  for ann in coco["annotations"]:
    by_image.setdefault(ann["image_id"], []).append(ann)

  _link_images(image_dir, epath.Path(out) / "JPEGImages" / year, coco["images"], workers)
  mask_dir = epath.Path(out) / "SegmentationClass" / year
  mask_dir.mkdir(parents=True, exist_ok=True)
  tasks = []
  for img in sorted(coco["images"], key=lambda i: i["file_name"]):
    stem = os.path.splitext(img["file_name"])[0]
    anns = by_image.get(img["id"], [])
    out_path = str(mask_dir / f"{stem}.png")
    tasks.append((stem, out_path, img["height"], img["width"], anns, values))
  del coco, by_image

  labels = {}
  bar = _progress(len(tasks), f"COCO {split}", progress)
  for image_id, vals in parallel.imap(
    _convert_one, tasks, workers=workers or os.cpu_count() or 1, chunksize=64
  ):
    labels[image_id] = vals
    bar.update(1)
  bar.close()

  ids = [t[0] for t in tasks if labels[t[0]]]
  _write_lines(epath.Path(out) / "ImageSets" / f"{split}.txt", ids)
  _write_lines(
    epath.Path(out) / "ImageLabels" / f"{split}.txt",
    [" ".join([i] + [str(v) for v in labels[i]]) for i in ids],
  )
  _write_lines(epath.Path(out) / "classes.txt", names)
  if split in EXPECTED and len(ids) != EXPECTED[split]:
    log.warning(
      "COCO %s: %d labelled images (WeCLIP's list has %d)", split, len(ids), EXPECTED[split]
    )
  log.info("COCO %s: %d of %d images have labels", split, len(ids), len(tasks))
  return len(ids)


def _link_images(image_dir, link, images, workers: int) -> None:
  """Makes out/JPEGImages/<year> show the COCO images: a symlink to the image folder when both
  are local, else (gs:// on either side) a copy of each image that is not there yet."""
  if "://" not in f"{image_dir}{link}":
    link.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(link):
      os.symlink(os.path.abspath(image_dir), link)
    return

  def copy(name):
    dst = link / name
    if not dst.is_file():
      files.write_bytes(dst, (image_dir / name).read_bytes())

  with concurrent.futures.ThreadPoolExecutor(max(1, workers or 16)) as pool:
    list(pool.map(copy, (img["file_name"] for img in images)))


def _write_lines(path, lines):
  files.write_bytes(path, "".join(f"{line}\n" for line in lines).encode())  # Atomic; gs:// too.


class _NoBar:
  def update(self, n):
    del n

  def close(self):
    pass


def _progress(total, desc, enabled):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm

  return tqdm(total=total, desc=desc, unit="img", file=sys.stderr)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", required=True, help="COCO folder (train2014/, val2014/, annotations/)")
  p.add_argument("--out", required=True, help="output folder; becomes data.root")
  p.add_argument("--splits", default="train,val", help="comma-separated: train,val")
  p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    for split in args.splits.split(","):
      convert_split(args.root, args.out, _split_name(split.strip()), workers=args.workers)
  except DataError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
