"""Superpixels: backends against skimage, area scaling, precompute/resume/verify, start-up check."""

import os

import numpy as np
import pytest
from skimage.segmentation import slic

from ssr_jax.data import files, superpixels, synthetic
from ssr_jax.data.files import DataError
from tests.data.conftest import synthetic_config


@pytest.fixture(scope="module")
def image():
  return synthetic.generate(1, size=160, seed=2)["image"][0]


def test_skimage_backend_is_slic_with_scaled_segments(image):
  got = superpixels.compute(image, backend="skimage", n_segments=100)
  n = round(100 * 160 * 160 / (320 * 320))
  assert n == superpixels.num_segments(160, 160, 100) == 25
  want = slic(image, n_segments=n, compactness=10.0, sigma=1.0, start_label=0, channel_axis=-1)
  # Same partition, ids consecutive from 0.
  np.testing.assert_array_equal(got, np.unique(want, return_inverse=True)[1].reshape(want.shape))
  assert got.dtype == np.int32 and got.min() == 0
  assert np.array_equal(np.unique(got), np.arange(got.max() + 1))


def test_segment_count_scales_with_area(image):
  big = np.kron(image, np.ones((2, 2, 1), np.uint8))  # 320x320: ~100 segments.
  n_small = superpixels.compute(image, n_segments=100).max() + 1
  n_big = superpixels.compute(big, n_segments=100).max() + 1
  assert 2.5 < n_big / n_small < 6 and 50 < n_big < 150


def test_opencv_backend(image):
  pytest.importorskip("cv2.ximgproc")
  sp = superpixels.compute(image, backend="opencv", n_segments=100)
  assert sp.shape == image.shape[:2] and sp.dtype == np.int32
  assert np.array_equal(np.unique(sp), np.arange(sp.max() + 1))
  assert 10 <= sp.max() + 1 <= 60  # ~25 requested.
  with pytest.raises(ValueError, match="unknown superpixel backend"):
    superpixels.compute(image, backend="watershed")


def test_precompute_resume_verify_and_check(tmp_path):
  root = str(tmp_path / "syn")
  synthetic.write_dataset(root, num_train=4, num_val=2, size=48, seed=0)
  cfg = synthetic_config(root, superpixel_backend="skimage", n_segments=200)
  with pytest.raises(DataError) as e:
    superpixels.check_superpixels(cfg, "train")
  msg = str(e.value)
  assert "Superpixels_skimage_200 does not exist" in msg
  assert (
    f"python -m ssr_jax.data.superpixels --config configs/demo.py --config.data.root={root}" in msg
  )
  assert "--split train" in msg and "--config.data.n_segments=200" in msg

  out = superpixels.precompute(cfg, "train", workers=1, progress=False)
  assert out["written"] == 4 and not out["problems"]
  d = superpixels.check_superpixels(cfg, "train")
  sp = files.read_superpixels(os.path.join(d, "train_00000.png"))
  img = files.read_image(os.path.join(root, "JPEGImages", "train_00000.png"))
  np.testing.assert_array_equal(sp, superpixels.compute(img, n_segments=200))

  os.remove(os.path.join(d, "train_00001.png"))
  with open(os.path.join(d, "train_00002.png"), "wb") as f:
    f.write(b"junk")
  with pytest.raises(DataError, match=r"(?s)1 of 4 .*train_00001\.png.*python -m ssr_jax"):
    superpixels.check_superpixels(cfg, "train")
  v = superpixels.precompute(cfg, "train", workers=1, verify=True, progress=False)
  assert v["written"] == 0 and len(v["problems"]) == 2
  assert any("train_00001" in p for p in v["problems"])
  assert any("train_00002" in p for p in v["problems"])
  again = superpixels.precompute(cfg, "train", workers=1, progress=False)
  assert again["written"] == 2 and not again["problems"]  # Only the missing and the corrupt.
