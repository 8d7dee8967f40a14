"""COCO conversion on a tiny hand-written instances json: class order, crowd, overlaps, resume."""

import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")

from ssr_jax.data import coco, files, sources  # noqa: E402
from tests.data.conftest import data_config  # noqa: E402

H, W = 20, 30


def rle(mask):
  """COCO uncompressed RLE of a bool mask (column-major runs, starting with zeros)."""
  flat = mask.ravel(order="F").astype(np.int8)
  change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  counts = np.diff(np.concatenate([[0], change])).tolist()
  return {"counts": counts, "size": [H, W]}


def box(y0, y1, x0, x1):
  m = np.zeros((H, W), bool)
  m[y0:y1, x0:x1] = True
  return m


@pytest.fixture()
def coco_root(tmp_path):
  rng = np.random.default_rng(0)
  cat_ids = sorted(rng.choice(np.arange(1, 91), 80, replace=False).tolist())
  cats = [{"id": c, "name": f"cat{c}"} for c in reversed(cat_ids)]  # Unsorted on purpose.
  big, small, other = cat_ids[10], cat_ids[70], cat_ids[0]
  crowd = box(0, 6, 0, 10)
  anns = [
    # Image 1: a large polygon, a small RLE object inside it (drawn last: wins), a crowd
    # region overlapping the polygon's corner (objects win), listed small-first.
    {
      "id": 1,
      "image_id": 1,
      "category_id": small,
      "iscrowd": 0,
      "area": 16.0,
      "segmentation": rle(box(8, 12, 10, 14)),
    },
    {
      "id": 2,
      "image_id": 1,
      "category_id": big,
      "iscrowd": 0,
      "area": 416.0,
      "segmentation": [[4.0, 4.0, 26.0, 4.0, 26.0, 16.0, 4.0, 16.0]],
    },
    {
      "id": 3,
      "image_id": 1,
      "category_id": other,
      "iscrowd": 1,
      "area": 60.0,
      "segmentation": rle(crowd),
    },
    # Image 2: only a crowd region -> no label -> not in the split list.
    {
      "id": 4,
      "image_id": 2,
      "category_id": big,
      "iscrowd": 1,
      "area": 60.0,
      "segmentation": rle(crowd),
    },
  ]
  images = [
    {"id": k, "file_name": f"COCO_train2014_{k:012d}.jpg", "height": H, "width": W}
    for k in (1, 2, 3)
  ]  # Image 3 has no annotation.
  root = tmp_path / "coco"
  (root / "annotations").mkdir(parents=True)
  (root / "train2014").mkdir()
  for im in images:
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "train2014" / im["file_name"])
  with open(root / "annotations" / "instances_train2014.json", "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats}, f)
  values = {c: v for v, c in enumerate(cat_ids, 1)}
  return root, values, (big, small, other)


def test_convert_and_read(coco_root, tmp_path):
  root, values, (big, small, other) = coco_root
  out = tmp_path / "out"
  assert coco.convert_split(str(root), str(out), "train", workers=2, progress=False) == 1
  m = files.read_mask(str(out / "SegmentationClass/train2014/COCO_train2014_000000000001.png"), 81)
  want = np.zeros((H, W), np.uint8)
  want[box(0, 6, 0, 10)] = 255
  want[box(5, 16, 5, 26)] = values[big]  # Polygon interior (its edges are checked loosely).
  want[box(8, 12, 10, 14)] = values[small]
  edge = box(3, 18, 3, 28) & ~box(5, 16, 5, 26)  # Pixels on the polygon outline.
  np.testing.assert_array_equal(m[~edge], want[~edge])
  assert set(np.unique(m[edge])) <= {0, 255, values[big]}
  assert (out / "ImageSets/train.txt").read_text().split() == ["COCO_train2014_000000000001"]
  line = (out / "ImageLabels/train.txt").read_text().split()
  want_labels = [str(v) for v in sorted((values[big], values[small]))]
  assert line == ["COCO_train2014_000000000001", *want_labels]
  names = (out / "classes.txt").read_text().split()
  assert names[0] == f"cat{min(values)}" and len(names) == 80
  assert os.path.islink(out / "JPEGImages" / "train2014")

  cfg = data_config(name="coco", root=str(out), num_classes=81, crop_size=16, num_workers=1)
  split = sources.get_dataset(cfg).split("train")
  assert split.ids == ("COCO_train2014_000000000001",)
  assert np.flatnonzero(split.labels[0]).tolist() == sorted([values[big] - 1, values[small] - 1])


def test_resume_keeps_valid_and_rewrites_corrupt(coco_root, tmp_path):
  root, _, _ = coco_root
  out = tmp_path / "out"
  coco.convert_split(str(root), str(out), "train", workers=1, progress=False)
  p1 = out / "SegmentationClass/train2014/COCO_train2014_000000000001.png"
  p2 = out / "SegmentationClass/train2014/COCO_train2014_000000000002.png"
  good = p1.read_bytes()
  os.utime(p1, (1, 1))
  p2.write_bytes(b"not a png")
  coco.convert_split(str(root), str(out), "train", workers=1, progress=False)
  assert os.stat(p1).st_mtime == 1  # Kept.
  assert files.read_mask(str(p2), 81).max() == 255 and p1.read_bytes() == good


def test_missing_inputs(tmp_path):
  with pytest.raises(files.DataError, match="instances_train2014.json"):
    coco.convert_split(str(tmp_path), str(tmp_path / "o"), "train", workers=1, progress=False)
  with pytest.raises(files.DataError, match="python -m ssr_jax.data.coco"):
    sources.get_dataset(data_config(name="coco", root=str(tmp_path), num_classes=81))


def test_tfds_build_of_converted_coco(coco_root, tmp_path):
  """The converted folder's TFDS build: same eval items, labels from the labels file, names."""
  from ssr_jax.data import pipeline, tfds_build

  root, _, _ = coco_root
  out = tmp_path / "out"
  coco.convert_split(str(root), str(out), "train", workers=1, progress=False)
  cfg = data_config(name="coco", root=str(out), num_classes=81, crop_size=16, num_workers=1)
  cfg.tfds_data_dir = str(tmp_path / "tfds")
  tfds_build.build(cfg, ["train"], superpixels=False, workers=1)
  tcfg = cfg.copy_and_resolve_references()
  tcfg.source = "tfds"
  assert (
    sources.class_names(tcfg) == sources.class_names(cfg) and len(sources.class_names(tcfg)) == 80
  )
  a = pipeline.make_eval_dataset(cfg, "train", superpixels=False)[0]
  b = pipeline.make_eval_dataset(tcfg, "train", superpixels=False)[0]
  assert a["id"] == b["id"] == "COCO_train2014_000000000001"
  for k in ("image", "mask", "labels"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert b["labels"].sum() == 2
