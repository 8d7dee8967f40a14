"""VOC reader: shipped split lists, root resolution, palette masks, labels."""

import numpy as np
import pytest
from PIL import Image

from ssr_jax.data import dataset, pipeline, sources, voc
from ssr_jax.data.files import DataError
from tests.data.conftest import data_config, random_image, write_voc_tree


def test_shipped_split_lists():
  ids = {s: dataset.read_list(voc.split_file(s)) for s in ("train_aug", "val", "train")}
  assert {s: len(v) for s, v in ids.items()} == {"train_aug": 10582, "val": 1449, "train": 1464}
  assert all(len(set(v)) == len(v) for v in ids.values())
  assert set(ids["train"]) <= set(ids["train_aug"])
  assert not set(ids["train_aug"]) & set(ids["val"])
  with pytest.raises(DataError, match="unknown VOC split"):
    voc.split_file("trainval_aug")


def test_root_is_devkit_or_voc2012(tmp_path):
  rng = np.random.default_rng(0)
  voc2012 = tmp_path / "VOCdevkit" / "VOC2012"
  lst = write_voc_tree(voc2012, [random_image(rng, 10, 12)], [np.full((10, 12), 4, np.uint8)])
  for root in (tmp_path / "VOCdevkit", voc2012):
    ds = sources.get_dataset(data_config(name="voc", root=str(root)))
    assert ds.root == str(voc2012) and ds.num_classes == 21 and len(ds.class_names) == 20
    split = ds.split(lst)
    np.testing.assert_array_equal(split.labels[0], np.eye(20, dtype=np.float32)[3])


def test_num_classes_must_match(tmp_path):
  rng = np.random.default_rng(0)
  write_voc_tree(tmp_path, [random_image(rng, 10, 12)], [np.ones((10, 12), np.uint8)])
  with pytest.raises(DataError, match="num_classes is 81"):
    sources.get_dataset(data_config(name="voc", root=str(tmp_path), num_classes=81))


def test_palette_masks_read_as_indices(tmp_path):
  """VOC's SegmentationClass PNGs are palette images: values are the palette indices."""
  rng = np.random.default_rng(1)
  m = rng.choice([0, 5, 12, 255], (24, 30)).astype(np.uint8)
  lst = write_voc_tree(tmp_path, [random_image(rng, 24, 30)], [None])
  (tmp_path / "SegmentationClass").mkdir()
  im = Image.frombytes("P", (30, 24), m.tobytes())
  im.putpalette(np.random.default_rng(2).integers(0, 256, 768).astype(np.uint8).tobytes())
  im.save(tmp_path / "SegmentationClass" / "im0.png")
  cfg = data_config(
    name="voc",
    root=str(tmp_path),
    train_split=lst,
    crop_size=40,
    scale_range=(1.0, 1.0),
    hflip=False,
    num_workers=1,
  )
  split = sources.get_dataset(cfg).split(lst)
  np.testing.assert_array_equal(split.labels[0][[4, 11]], [1, 1])
  assert split.labels[0].sum() == 2
  names = ["numpy"]
  try:
    import tensorflow  # noqa: F401

    names.append("tf")
  except ImportError:
    pass
  for name in names:
    with pipeline.make_train_iterator(
      cfg,
      batch_size=1,
      seed=0,
      superpixels=False,
      process_index=0,
      process_count=1,
      pipeline=name,
    ) as it:
      mask = next(it)["mask"][0]
    valid = mask != 255
    assert set(np.unique(mask[valid])) <= {0, 5, 12}
    assert valid.sum() == (m != 255).sum()  # Identity scale: the same pixels, shifted.
