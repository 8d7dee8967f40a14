"""Superpixels and their colour clusters: backends against skimage, area scaling, K-means,
precompute/resume/verify, start-up check."""

import os

import numpy as np
import pytest
from skimage.color import rgb2lab
from skimage.segmentation import slic

from ssr_jax.data import check, files, superpixels, synthetic
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
  cfg = synthetic_config(
    root, superpixel_backend="skimage", superpixel_scale=1, slic_iterations=10, n_segments=200
  )
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

  # Colour clusters beside the superpixels, derived from them; --verify checks them too.
  cd = os.path.join(d, "clusters_k8")
  assert again["cluster_dir"] == cd == superpixels.cluster_directory(cfg, root)
  superpixels.check_superpixels(cfg, "train", clusters=True)
  cl = files.read_clusters(os.path.join(cd, "train_00000.png"))
  np.testing.assert_array_equal(cl, superpixels.color_clusters(img, sp, num_clusters=8))
  os.remove(os.path.join(cd, "train_00003.png"))
  files.write_png(os.path.join(cd, "train_00001.png"), np.full((48, 48), 9, np.uint8))  # >= K.
  v = superpixels.precompute(cfg, "train", workers=1, verify=True, progress=False)
  assert v["written"] == 0 and len(v["problems"]) == 2
  assert any("missing" in p and "train_00003" in p for p in v["problems"])
  assert any("cluster id 9 >= data.color_clusters=8" in p for p in v["problems"])
  with pytest.raises(DataError, match=r"(?s)1 of 4 colour-cluster files .*train_00003\.png"):
    superpixels.check_superpixels(cfg, "train", clusters=True)
  fixed = superpixels.precompute(cfg, "train", workers=1, progress=False)
  assert fixed["written"] == 2 and not fixed["problems"]
  np.testing.assert_array_equal(cl, files.read_clusters(os.path.join(cd, "train_00000.png")))
  stale = np.arange(48 * 48).reshape(48, 48) % 2  # Not constant on any superpixel.
  files.write_png(os.path.join(cd, "train_00000.png"), stale.astype(np.uint8))
  (problem,) = superpixels.precompute(cfg, "train", workers=1, verify=True, progress=False)[
    "problems"
  ]
  assert "train_00000.png is not constant on the superpixels" in problem
  assert superpixels.precompute(cfg, "train", workers=1, progress=False)["written"] == 1
  np.testing.assert_array_equal(cl, files.read_clusters(os.path.join(cd, "train_00000.png")))
  files.write_png(os.path.join(cd, "train_00002.png"), np.zeros((40, 48), np.uint8))
  r = check.check_split(cfg, "train", workers=1)
  assert len(r.problems) == 2 and "train_00002.png is 40x48 but image" in r.problems[0]
  assert superpixels.command(cfg, "train") in r.problems[1]


def test_rgb_to_lab_matches_skimage():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  x[0, :8] = [[0, 0, 0], [255, 255, 255], [10, 10, 10], [255, 0, 0], [0, 255, 0], [0, 0, 255],
              [1, 2, 3], [128, 128, 128]]  # fmt: skip
  np.testing.assert_allclose(superpixels.rgb_to_lab(x), rgb2lab(x), atol=1e-9)


def _kmeans_np(points, weights, k, iters=100):
  """Straightforward loops: maximin init from the heaviest point, weighted Lloyd."""
  centres = [int(np.argmax(weights))]
  while len(centres) < k:
    d = [min(float(np.sum((p - points[c]) ** 2)) for c in centres) for p in points]
    if max(d) == 0:
      break
    centres.append(int(np.argmax(d)))
  c = points[centres].copy()
  assign = None
  for _ in range(iters):
    new = np.array([int(np.argmin([np.sum((p - q) ** 2) for q in c])) for p in points])
    if assign is not None and np.array_equal(new, assign):
      break
    assign = new
    for j in range(len(c)):
      if np.any(assign == j):
        w = weights[assign == j]
        c[j] = (points[assign == j] * w[:, None]).sum(0) / w.sum()
  return assign


def test_kmeans_matches_loops_and_handles_few_colours():
  rng = np.random.default_rng(1)
  pts = np.concatenate([rng.normal(m, 3.0, (15, 3)) for m in (0, 20, 40, 60)])
  w = rng.integers(1, 50, len(pts)).astype(np.float64)
  got = superpixels.kmeans(pts, w, 4)
  np.testing.assert_array_equal(got, _kmeans_np(pts, w, 4))
  assert [len(set(got[i : i + 15])) for i in range(0, 60, 15)] == [1, 1, 1, 1]  # The 4 blobs.
  pts = rng.normal(0, 10, (40, 5))
  assert np.array_equal(superpixels.kmeans(pts, w[:40], 6), _kmeans_np(pts, w[:40], 6))
  # Two distinct colours, K = 8: two clusters, ids 0 and 1 (heaviest point's cluster first).
  two = np.repeat([[0.0, 0, 0], [50, 0, 0]], [3, 5], axis=0)
  out = superpixels.kmeans(two, np.array([1, 1, 1, 9, 1, 1, 1, 1.0]), 8)
  np.testing.assert_array_equal(out, [1, 1, 1, 0, 0, 0, 0, 0])


def test_color_clusters_group_superpixels_by_colour(image):
  sp = superpixels.compute(image, n_segments=100)
  cl = superpixels.color_clusters(image, sp, num_clusters=5)
  assert cl.dtype == np.uint8 and cl.shape == sp.shape
  assert np.array_equal(np.unique(cl), np.arange(5))
  for s in range(sp.max() + 1):  # Constant on each superpixel.
    assert len(np.unique(cl[sp == s])) == 1
  # The same K-means on mean Lab colours per superpixel, by hand.
  lab = rgb2lab(image)
  n = sp.max() + 1
  area = np.array([np.sum(sp == s) for s in range(n)], np.float64)
  means = np.stack([lab[sp == s].mean(0) for s in range(n)])
  want = _kmeans_np(means, area, 5)
  np.testing.assert_array_equal(cl, want[sp])
  # Deterministic; the position term moves assignments and gets its own folder name.
  np.testing.assert_array_equal(cl, superpixels.color_clusters(image, sp, num_clusters=5))
  far = superpixels.color_clusters(image, sp, num_clusters=5, position_weight=1e4)
  assert not np.array_equal(np.unique(far, return_inverse=True)[1], want[sp])
  assert superpixels.cluster_folder(8, 0.0) == "clusters_k8"
  assert superpixels.cluster_folder(8, 25.0) == "clusters_k8_p25"
  with pytest.raises(ValueError, match="data.color_clusters"):
    superpixels.color_clusters(image, sp, num_clusters=256)
  # Two flat colours: two clusters whatever K.
  flat = np.zeros((40, 40, 3), np.uint8)
  flat[:, 20:] = 200
  two = superpixels.color_clusters(flat, superpixels.compute(flat, n_segments=400))
  np.testing.assert_array_equal(two, (np.arange(40) >= 20)[None].repeat(40, 0).astype(np.uint8))
