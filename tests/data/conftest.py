"""Shared fixtures: a small synthetic dataset on disk (with skimage superpixels) and configs."""

import numpy as np
import pytest
from PIL import Image

from configs import base
from ssr_jax.data import files, superpixels, synthetic


def data_config(**overrides):
  """A copy of base.get_config().data with overrides (the config is locked to known fields)."""
  c = base.get_config()
  for k, v in overrides.items():
    setattr(c.data, k, v)
  return c.data


def synthetic_config(root, **overrides):
  kw = dict(
    name="synthetic",
    root=str(root),
    train_split="train",
    val_split="val",
    num_classes=7,
    crop_size=64,
    num_workers=2,
    prefetch=1,
    # The skimage reference superpixels (Superpixels_skimage_100), not the faster base default.
    superpixel_backend="skimage",
    superpixel_scale=1,
    slic_iterations=10,
  )
  kw.update(overrides)
  return data_config(**kw)


@pytest.fixture(scope="session")
def syn_root(tmp_path_factory):
  """Synthetic dataset (24 train / 8 val, 96 px) with precomputed skimage superpixels."""
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.write_dataset(str(root), num_train=24, num_val=8, size=96, seed=0)
  cfg = synthetic_config(root)
  for split in ("train", "val"):
    out = superpixels.precompute(cfg, split, workers=1, progress=False)
    assert not out["problems"]
  return root


def write_voc_tree(root, images, masks, *, ids=None, list_name="mylist.txt", mask_dir=None):
  """A VOC-layout folder (JPEGImages/*.jpg or given files, SegmentationClassAug/*.png).

  images: list of uint8 arrays (saved as JPEG quality 95) or raw bytes (written as is).
  Returns the path of a split list naming them.
  """
  ids = ids or [f"im{i}" for i in range(len(images))]
  (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
  for i, im, m in zip(ids, images, masks):
    path = root / "JPEGImages" / f"{i}.jpg"
    if isinstance(im, bytes):
      path.write_bytes(im)
    else:
      Image.fromarray(im).save(path, quality=95)
    if m is not None:
      files.write_png(str(root / (mask_dir or "SegmentationClassAug") / f"{i}.png"), m)
  lst = root / list_name
  lst.write_text("".join(f"{i}\n" for i in ids))
  return str(lst)


def random_image(rng, h, w):
  """A smooth-ish random RGB image (JPEG-friendly, non-trivial after resizing)."""
  x = rng.integers(0, 256, (h, w, 3)).astype(np.int64)
  return (np.cumsum(np.cumsum(x, 0), 1) // 7 % 256).astype(np.uint8)
