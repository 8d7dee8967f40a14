"""The reduced-scale SLIC path (data.superpixel_scale, data.slic_iterations) and the shared
OpenCV Lab image, against independent numpy / skimage oracles; its quality (ASA) against the
skimage reference on synthetic images (no timing)."""

import os

import numpy as np
import pytest
from skimage.color import rgb2lab
from skimage.segmentation import slic

from benchmarks.superpixels import asa, voc_like_images
from ssr_jax.data import files, parallel, superpixels, synthetic
from tests.data.conftest import synthetic_config


def _consecutive(sp):
  return sp.dtype == np.int32 and np.array_equal(np.unique(sp), np.arange(sp.max() + 1))


def test_upscale_is_nearest_and_downscale_is_block_mean():
  rng = np.random.default_rng(0)
  low = rng.integers(0, 50, (4, 5))
  for h, w in ((8, 10), (7, 9), (8, 9)):
    want = np.repeat(np.repeat(low, 2, 0), 2, 1)[:h, :w]
    np.testing.assert_array_equal(superpixels.upscale(low, 2, h, w), want)
  x = rng.random((7, 9, 3)).astype(np.float32)  # Odd sizes: partial blocks at the border.
  got = superpixels.downscale(x, 2)
  assert got.shape == (4, 5, 3)
  for i in range(4):
    for j in range(5):
      block = x[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
      block = np.concatenate([block, block[-1:]], 0) if block.shape[0] == 1 else block
      block = np.concatenate([block, block[:, -1:]], 1) if block.shape[1] == 1 else block
      np.testing.assert_allclose(got[i, j], block.mean((0, 1)), rtol=1e-6)


def test_skimage_at_half_scale_is_slic_of_the_block_mean():
  image = synthetic.generate(1, size=96, seed=3)["image"][0][:95, :90]  # Odd height.
  got = superpixels.compute(image, backend="skimage", n_segments=200, scale=2, iterations=7)
  x = image.astype(np.float64) / 255
  x = np.pad(x, ((0, 1), (0, 0), (0, 0)), mode="edge")
  x = x.reshape(48, 2, 45, 2, 3).mean((1, 3))
  n = superpixels.num_segments(95, 90, 200)
  want = slic(
    x.astype(np.float32), n_segments=n, sigma=0.5, max_num_iter=7, start_label=0, channel_axis=-1
  )
  want = np.unique(want, return_inverse=True)[1].reshape(want.shape)
  want = np.repeat(np.repeat(want, 2, 0), 2, 1)[:95, :90]
  np.testing.assert_array_equal(got, want)
  assert _consecutive(got)


def test_opencv_half_scale_labels_and_shared_lab():
  pytest.importorskip("cv2.ximgproc")
  image = voc_like_images(1, seed=4)[0][0]
  sp = superpixels.compute(image, backend="opencv", scale=2, iterations=5)
  assert sp.shape == image.shape[:2] and _consecutive(sp)
  np.testing.assert_array_equal(sp, superpixels.upscale(sp[::2, ::2], 2, *sp.shape))
  assert 0.6 < (sp.max() + 1) / superpixels.num_segments(375, 500, 100) < 1.6
  lab = superpixels.opencv_lab(image)
  assert lab.dtype == np.float32
  np.testing.assert_allclose(lab, rgb2lab(image), atol=0.5)
  np.testing.assert_array_equal(
    sp, superpixels.compute(image, backend="opencv", scale=2, iterations=5, lab=lab)
  )
  # Clusters from a given Lab image: the reference conversion gives the reference clusters.
  np.testing.assert_array_equal(
    superpixels.color_clusters(image, sp, lab=superpixels.rgb_to_lab(image)),
    superpixels.color_clusters(image, sp),
  )
  assert superpixels.shares_lab("opencv", 2) and not superpixels.shares_lab("opencv", 1)
  assert not superpixels.shares_lab("skimage", 2)
  with pytest.raises(ValueError, match="superpixel_scale"):
    superpixels.compute(image, scale=0)


def test_fast_settings_quality_holds_against_skimage():
  """ASA of opencv at half scale, 5 iterations (superpixels and their clusters) within half a
  percentage point of (or above) the skimage reference at full scale."""
  pytest.importorskip("cv2.ximgproc")
  images, masks = voc_like_images(4, seed=1)
  ref, fast, ref_cl, fast_cl = [], [], [], []
  for im, m in zip(images, masks):
    sp = superpixels.compute(im, backend="skimage")
    ref.append(asa(sp, m))
    ref_cl.append(asa(superpixels.color_clusters(im, sp), m))
    lab = superpixels.opencv_lab(im)
    sp = superpixels.compute(im, backend="opencv", scale=2, iterations=5, lab=lab)
    fast.append(asa(sp, m))
    fast_cl.append(asa(superpixels.color_clusters(im, sp, lab=lab), m))
  assert np.mean(fast) > np.mean(ref) - 0.005
  assert np.mean(fast_cl) > np.mean(ref_cl) - 0.005


def test_folder_names_and_command_carry_the_settings(tmp_path):
  assert superpixels.default_dir("r", "skimage", 100) == os.path.join(
    "r", "Superpixels_skimage_100"
  )
  assert superpixels.default_dir("r", "opencv", 100, 2, 5).endswith("Superpixels_opencv_100_s2_i5")
  assert superpixels.default_dir("r", "opencv", 100, 1, 5).endswith("Superpixels_opencv_100_i5")
  cfg = synthetic_config(tmp_path, superpixel_backend="opencv", superpixel_scale=2)
  cfg.slic_iterations = 5
  assert superpixels.directory(cfg, str(tmp_path)).endswith("Superpixels_opencv_100_s2_i5")
  cmd = superpixels.command(cfg, "train")
  assert "--config.data.superpixel_scale=2" in cmd and "--config.data.slic_iterations=5" in cmd


@pytest.mark.parametrize("workers", [1, 2])
def test_precompute_fast_settings_writes_what_compute_gives(tmp_path, workers):
  pytest.importorskip("cv2.ximgproc")
  root = str(tmp_path / "syn")
  synthetic.write_dataset(root, num_train=4, num_val=1, size=64, seed=0)
  cfg = synthetic_config(root, superpixel_backend="opencv", superpixel_scale=2, n_segments=400)
  cfg.slic_iterations = 5
  out = superpixels.precompute(cfg, "train", workers=workers, progress=False)
  assert out["written"] == 4 and not out["problems"]
  assert out["dir"].endswith("Superpixels_opencv_400_s2_i5")
  superpixels.check_superpixels(cfg, "train", clusters=True)
  want = {}
  for i in range(4):
    img = files.read_image(os.path.join(root, "JPEGImages", f"train_{i:05d}.png"))
    sp = files.read_superpixels(os.path.join(out["dir"], f"train_{i:05d}.png"))
    kw = dict(backend="opencv", n_segments=400, scale=2, iterations=5)
    np.testing.assert_array_equal(sp, superpixels.compute(img, **kw))
    want[i] = superpixels.color_clusters(img, sp, lab=superpixels.opencv_lab(img))
    cl = files.read_clusters(os.path.join(out["cluster_dir"], f"train_{i:05d}.png"))
    np.testing.assert_array_equal(cl, want[i])
  # Resume: only the missing cluster file is remade, from the stored superpixels.
  os.remove(os.path.join(out["cluster_dir"], "train_00001.png"))
  again = superpixels.precompute(cfg, "train", workers=workers, progress=False)
  assert again["written"] == 1 and not again["problems"]
  np.testing.assert_array_equal(
    want[1], files.read_clusters(os.path.join(out["cluster_dir"], "train_00001.png"))
  )


def _opencv_threads(_):
  import cv2

  return cv2.getNumThreads()


def test_precompute_workers_run_opencv_single_threaded():
  pytest.importorskip("cv2")
  got = parallel.imap(
    _opencv_threads, [0, 1, 2, 3], workers=2, chunksize=1, initializer=superpixels._init_worker
  )
  assert list(got) == [1, 1, 1, 1]
