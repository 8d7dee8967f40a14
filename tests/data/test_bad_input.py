"""Bad input gets a clear DataError naming the file (both pipelines), and check.py lists all."""

import io

import numpy as np
import pytest
from PIL import Image

from ssr_jax.data import check, files, pipeline, sources, superpixels
from ssr_jax.data.files import DataError
from tests.data.conftest import data_config, random_image, write_voc_tree

try:
  import tensorflow  # noqa: F401

  PIPELINES = ["numpy", "tf"]
except ImportError:
  PIPELINES = ["numpy"]


def jpeg_bytes(image, quality=95):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def voc(tmp_path, images, masks, **kw):
  lst = write_voc_tree(tmp_path, images, masks)
  return data_config(
    name="voc",
    root=str(tmp_path),
    train_split=lst,
    val_split=lst,
    crop_size=32,
    num_workers=1,
    prefetch=1,
    **kw,
  ), lst


def first_batch(cfg, name, batch_size):
  with pipeline.make_train_iterator(
    cfg,
    batch_size=batch_size,
    seed=0,
    superpixels=False,
    process_index=0,
    process_count=1,
    pipeline=name,
  ) as it:
    return next(it)


@pytest.mark.parametrize("name", PIPELINES)
def test_truncated_jpeg_names_the_file(tmp_path, name):
  rng = np.random.default_rng(0)
  good = random_image(rng, 40, 50)
  masks = [np.ones((40, 50), np.uint8)] * 2
  cfg, _ = voc(tmp_path, [good, jpeg_bytes(good)[:300]], masks)
  with pytest.raises(DataError, match=r"im1\.jpg.*(corrupt|truncated)"):
    first_batch(cfg, name, 2)


@pytest.mark.parametrize("name", PIPELINES)
def test_grayscale_and_rgba_are_converted(tmp_path, name):
  rng = np.random.default_rng(1)
  rgb = random_image(rng, 30, 40)
  gray = Image.fromarray(rgb[..., 0])
  rgba = Image.fromarray(np.dstack([rgb, np.full((30, 40), 7, np.uint8)]))
  (tmp_path / "JPEGImages").mkdir()
  gray.save(tmp_path / "JPEGImages" / "g.jpg", quality=95)
  rgba.save(tmp_path / "JPEGImages" / "a.png")
  m = np.ones((30, 40), np.uint8)
  for i in ("g", "a"):
    files.write_png(str(tmp_path / "SegmentationClassAug" / f"{i}.png"), m)
  # The reader expects .jpg; a PNG with a .jpg name is what some datasets really contain.
  (tmp_path / "JPEGImages" / "a.png").rename(tmp_path / "JPEGImages" / "a.jpg")
  lst = tmp_path / "l.txt"
  lst.write_text("g\na\n")
  g = files.read_image(str(tmp_path / "JPEGImages" / "g.jpg"))
  assert g.shape == (30, 40, 3) and np.array_equal(g[..., 0], g[..., 2])
  a = files.read_image(str(tmp_path / "JPEGImages" / "a.jpg"))
  np.testing.assert_array_equal(a, rgb)  # Alpha dropped, as PIL's convert("RGB").
  cfg = data_config(
    name="voc",
    root=str(tmp_path),
    train_split=str(lst),
    crop_size=64,
    scale_range=(1.0, 1.0),
    num_workers=1,
  )
  batch = first_batch(cfg, name, 2)
  assert batch["image"].shape == (2, 64, 64, 3)
  if name == "tf":
    np.testing.assert_array_equal(batch["image"], first_batch(cfg, "numpy", 2)["image"])


def test_mask_size_mismatch(tmp_path):
  rng = np.random.default_rng(2)
  cfg, lst = voc(tmp_path, [random_image(rng, 40, 50)], [np.ones((40, 49), np.uint8)])
  with pytest.raises(DataError, match=r"im0\.png.*40x49.*im0\.jpg.*40x50"):
    sources.get_dataset(cfg).split(lst)


@pytest.mark.parametrize("name", PIPELINES)
def test_mask_size_mismatch_at_load_time(tmp_path, name):
  """With a labels file the split is not scanned up front; loading still catches it."""
  rng = np.random.default_rng(2)
  labels = tmp_path / "labels.txt"
  labels.write_text("im0 1\nim1 1\n")
  masks = [np.ones((40, 50), np.uint8), np.ones((40, 49), np.uint8)]
  cfg, _ = voc(tmp_path, [random_image(rng, 40, 50)] * 2, masks, labels_file=str(labels))
  with pytest.raises(DataError, match=r"im1\.png.*must match"):
    first_batch(cfg, name, 2)


@pytest.mark.parametrize("name", PIPELINES)
def test_mask_values_out_of_range(tmp_path, name):
  rng = np.random.default_rng(3)
  bad = np.ones((20, 20), np.uint8)
  bad[0, 0] = 21
  labels = tmp_path / "labels.txt"
  labels.write_text("im0 1\nim1 1\n")
  cfg, lst = voc(
    tmp_path,
    [random_image(rng, 20, 20)] * 2,
    [np.ones((20, 20), np.uint8), bad],
    labels_file=str(labels),
  )
  with pytest.raises(DataError, match=r"im1\.png has values \[21\] outside 0\.\.20 and 255"):
    first_batch(cfg, name, 2)
  cfg2, _ = voc(tmp_path, [random_image(rng, 20, 20)] * 2, [np.ones((20, 20), np.uint8), bad])
  with pytest.raises(DataError, match=r"im1\.png has values \[21\]"):
    sources.get_dataset(cfg2).split(lst)


def test_split_list_naming_missing_file(tmp_path):
  """Missing files: one summary (counts, names, the likely cause and what to do)."""
  rng = np.random.default_rng(4)
  cfg, lst = voc(tmp_path, [random_image(rng, 20, 20)], [np.ones((20, 20), np.uint8)])
  with open(lst, "a") as f:
    f.write("ghost\n")
  # Some listed images absent: a list of images data.root does not have.
  with pytest.raises(
    DataError,
    match=r"1 of 2 images and 1 masks named by .*mylist\.txt are missing, e\.g\.\n.*ghost\.jpg\n"
    r".*ghost\.png\nLikely cause: the list names images your data\.root does not have"
    r".*--config\.data\.train_split=PATH",
  ):
    sources.get_dataset(cfg).split(lst)
  # None of them: data.root is the wrong folder (the layout follows).
  (tmp_path / "none.txt").write_text("ghost\nghost2\n")
  with pytest.raises(
    DataError, match=r"2 of 2 images and 2 masks .*\n[\s\S]*holds none of[\s\S]*JPEGImages/"
  ):
    sources.get_dataset(cfg).split(str(tmp_path / "none.txt"))
  # Masks alone.
  (tmp_path / "SegmentationClassAug" / "im0.png").unlink()
  (tmp_path / "one.txt").write_text("im0\n")
  with pytest.raises(
    DataError, match=r"^1 masks named by .*one\.txt.*\n.*im0\.png\nLikely cause: the masks"
  ):
    sources.get_dataset(cfg).split(str(tmp_path / "one.txt"))


def test_empty_dataset(tmp_path):
  rng = np.random.default_rng(5)
  cfg, _ = voc(tmp_path, [random_image(rng, 20, 20)], [np.ones((20, 20), np.uint8)])
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(DataError, match="empty"):
    sources.get_dataset(cfg).split(str(empty))
  with pytest.raises(DataError, match="JPEGImages"):
    sources.get_dataset(data_config(name="voc", root=str(tmp_path / "nowhere")))


def test_all_unlabeled_is_an_error(tmp_path):
  rng = np.random.default_rng(6)
  cfg, lst = voc(tmp_path, [random_image(rng, 20, 20)], [np.zeros((20, 20), np.uint8)])
  with pytest.raises(DataError, match="no image has a foreground label"):
    sources.get_dataset(cfg).split(lst, drop_unlabeled=True)


def test_check_reports_every_problem(tmp_path):
  rng = np.random.default_rng(7)
  good = random_image(rng, 30, 30)
  bad_vals = np.ones((30, 30), np.uint8)
  bad_vals[3, 3] = 40
  masks = [
    np.ones((30, 30), np.uint8),
    bad_vals,
    np.ones((29, 30), np.uint8),
    np.zeros((30, 30), np.uint8),
    np.ones((30, 30), np.uint8),
  ]
  images = [good, good, good, good, jpeg_bytes(good)[:200]]
  cfg, lst = voc(tmp_path, images, masks)
  r = check.check_split(cfg, lst, workers=2)
  text = "\n".join(r.problems)
  assert r.total == 5 and r.unlabeled == 1
  assert len(r.problems) == 3, text
  assert "im1.png has values [40]" in text
  assert "im2.png is 29x30" in text
  assert "im4.jpg" in text


def test_check_summarises_missing_files_and_checks_the_rest(tmp_path):
  """A list naming absent images: one summary problem, and the files present still checked."""
  rng = np.random.default_rng(8)
  bad = np.ones((20, 20), np.uint8)
  bad[0, 0] = 30
  cfg, lst = voc(tmp_path, [random_image(rng, 20, 20)] * 2, [np.ones((20, 20), np.uint8), bad])
  with open(lst, "a") as f:
    f.write("".join(f"gone{i}\n" for i in range(30)))
  r = check.check_split(cfg, lst, workers=2)
  assert r.total == 32 and len(r.problems) == 2, r.problems
  summary, values = r.problems
  assert summary.startswith("30 of 32 images and 30 masks named by ")
  assert summary.count("gone") == 10  # The first MAX_LISTED names, not all 60 files.
  assert "Likely cause: the list names images your data.root does not have" in summary
  assert "im1.png has values [30]" in values
  # The superpixel command stops before any work, naming them all in one count.
  with pytest.raises(DataError, match=r"^30 of 32 images named by [\s\S]*gone0\.jpg"):
    superpixels.precompute(cfg, lst, workers=1, progress=False)
  assert not (tmp_path / "Superpixels_opencv_100_s2_i5").exists()
