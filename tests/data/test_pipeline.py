"""Training iterator and eval dataset: both pipelines, determinism, resume, sharding, layout,
superpixels required or not."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from ssr_jax.data import (
  augment,
  dataset,
  examples,
  files,
  pipeline,
  sources,
  superpixels,
  synthetic,
)
from ssr_jax.data.files import DataError
from tests.data.conftest import synthetic_config

try:
  import tensorflow  # noqa: F401

  HAVE_TF = True
except ImportError:
  HAVE_TF = False
needs_tf = pytest.mark.skipif(not HAVE_TF, reason="TensorFlow not installed")


def take(cfg, n, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  kw.setdefault("superpixels", True)
  with pipeline.make_train_iterator(cfg, **kw) as it:
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout_and_oracle(syn_root):
  cfg = synthetic_config(syn_root)
  (batch,) = take(cfg, 1, batch_size=4, seed=0, pipeline="numpy", clusters=True)
  s = cfg.crop_size
  assert batch["image"].shape == (4, s, s, 3) and batch["image"].dtype == np.uint8
  assert batch["labels"].shape == (4, 6) and batch["labels"].dtype == np.float32
  assert batch["superpixels"].shape == (4, s, s) and batch["superpixels"].dtype == np.int32
  assert batch["clusters"].shape == (4, s, s) and batch["clusters"].dtype == np.int32
  assert batch["mask"].shape == (4, s, s) and batch["mask"].dtype == np.uint8
  assert batch["index"].dtype == np.int32
  split = sources.get_dataset(cfg).split("train")
  order = examples.Order(0, len(split))
  assert batch["index"].tolist() == [order(g) for g in range(4)]
  for j, i in enumerate(batch["index"]):
    # Labels of the whole image (independent: np.unique of the mask file), §1.1.
    full = files.read_mask(split.mask_paths[i], 7)
    want = np.zeros(6, np.float32)
    want[[v - 1 for v in np.unique(full) if 0 < v < 255]] = 1
    np.testing.assert_array_equal(batch["labels"][j], want)
    # The crop is the augment oracle applied to the decoded files with draws(seed, position).
    sp = files.read_superpixels(
      split.superpixel_paths(str(syn_root / "Superpixels_skimage_100"))[i]
    )
    cl = files.read_clusters(
      split.superpixel_paths(str(syn_root / "Superpixels_skimage_100" / "clusters_k8"))[i]
    )
    image = files.read_image(split.image_paths[i])
    p = augment.plan(96, 96, augment.draws(0, j), crop_size=s)
    img, m, spo = augment.apply(image, full, sp, p)
    np.testing.assert_array_equal(batch["image"][j], img)
    np.testing.assert_array_equal(batch["mask"][j], m)
    np.testing.assert_array_equal(batch["superpixels"][j], spo)
    # Clusters go through the superpixels' nearest resampling: constant on each superpixel.
    np.testing.assert_array_equal(batch["clusters"][j], augment.resample_labels(cl, p, -1))
    np.testing.assert_array_equal(batch["clusters"][j] < 0, spo < 0)
    table = np.zeros(sp.max() + 1, np.int32)
    table[sp] = cl
    np.testing.assert_array_equal(np.where(spo < 0, -1, table[spo]), batch["clusters"][j])
    pad = batch["superpixels"][j] < 0
    assert np.all(batch["image"][j][pad] == 0) and np.all(batch["mask"][j][pad] == 255)


@needs_tf
def test_tf_and_numpy_identical(syn_root):
  cfg = synthetic_config(syn_root, crop_size=112)  # > 96: exercises padding too.
  kw = dict(batch_size=4, seed=7, start_step=3)
  assert_batches_equal(take(cfg, 4, pipeline="numpy", **kw), take(cfg, 4, pipeline="tf", **kw))
  kw["clusters"] = True  # Both maps read.
  assert_batches_equal(take(cfg, 2, pipeline="numpy", **kw), take(cfg, 2, pipeline="tf", **kw))
  kw["superpixels"] = False
  a, b = take(cfg, 3, pipeline="numpy", **kw), take(cfg, 3, pipeline="tf", **kw)
  assert_batches_equal(a, b)
  assert {-1, 0} <= set(np.unique(a[0]["clusters"])) and a[0]["clusters"].max() > 0
  assert set(np.unique(a[0]["superpixels"])) == {-1, 0}  # Layout only.


@needs_tf
def test_tf_and_numpy_color_jitter_within_one(syn_root):
  cfg = synthetic_config(syn_root, color_jitter=0.4)
  a = take(cfg, 3, batch_size=4, seed=1, pipeline="numpy")
  b = take(cfg, 3, batch_size=4, seed=1, pipeline="tf")
  for x, y in zip(a, b):
    assert np.abs(x["image"].astype(int) - y["image"]).max() <= 1
    np.testing.assert_array_equal(x["mask"], y["mask"])


def test_resume_equals_fresh_and_skips_decoding(syn_root, monkeypatch):
  cfg = synthetic_config(syn_root)
  fresh = take(cfg, 9, batch_size=4, seed=5, pipeline="numpy", clusters=True)
  calls = []
  real = files.read_image
  monkeypatch.setattr(files, "read_image", lambda p: calls.append(p) or real(p))
  resumed = take(cfg, 2, batch_size=4, seed=5, start_step=7, pipeline="numpy", clusters=True)
  assert_batches_equal(fresh[7:], resumed)
  assert len(calls) <= 4 * (2 + cfg.prefetch + 1)  # Never the 28 skipped examples' worth more.


def test_process_workers_equal_threads(syn_root):
  cfg = synthetic_config(syn_root, worker_type="process")
  want = take(synthetic_config(syn_root), 3, batch_size=4, seed=4, pipeline="numpy")
  assert_batches_equal(want, take(cfg, 3, batch_size=4, seed=4, pipeline="numpy"))


def test_epochs_are_permutations(syn_root):
  cfg = synthetic_config(syn_root)
  batches = take(cfg, 12, batch_size=4, seed=2, pipeline="numpy")  # 2 epochs of 24.
  idx = np.concatenate([b["index"] for b in batches])
  assert sorted(idx[:24]) == list(range(24)) and sorted(idx[24:]) == list(range(24))
  assert not np.array_equal(idx[:24], idx[24:])


def test_hosts_take_slices_of_the_global_batch(syn_root):
  cfg = synthetic_config(syn_root)
  whole = take(cfg, 2, batch_size=4, seed=3, pipeline="numpy")
  parts = [
    take(cfg, 2, batch_size=4, seed=3, pipeline="numpy", process_index=p, process_count=2)
    for p in (0, 1)
  ]
  for step in range(2):
    for k in whole[step]:
      joined = np.concatenate([parts[0][step][k], parts[1][step][k]])
      np.testing.assert_array_equal(joined, whole[step][k])
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_iterator(
      cfg, batch_size=3, seed=0, superpixels=False, process_index=0, process_count=2
    )


def test_superpixels_off_keeps_valid_region(syn_root):
  cfg = synthetic_config(syn_root, crop_size=112)
  with_sp = take(cfg, 1, batch_size=4, seed=0, pipeline="numpy", clusters=True)[0]
  without = take(cfg, 1, batch_size=4, seed=0, pipeline="numpy", superpixels=False)[0]
  for key in ("superpixels", "clusters"):
    np.testing.assert_array_equal(without[key] >= 0, with_sp[key] >= 0)
    np.testing.assert_array_equal(without[key], with_sp["superpixels"].clip(-1, 0))
  assert set(np.unique(without["superpixels"])) <= {-1, 0}


def test_auto_pipeline():
  assert pipeline.resolve_pipeline("auto") == ("tf" if HAVE_TF else "numpy")
  assert pipeline.resolve_pipeline("numpy") == "numpy"
  with pytest.raises(ValueError):
    pipeline.resolve_pipeline("torch")


def test_numpy_pipeline_imports_no_tensorflow(syn_root):
  code = (
    "import sys\n"
    "from tests.data.conftest import synthetic_config\n"
    "from ssr_jax.data import pipeline\n"
    f"cfg = synthetic_config({str(syn_root)!r})\n"
    "it = pipeline.make_train_iterator(cfg, batch_size=2, seed=0, process_index=0,"
    " process_count=1, pipeline='numpy', superpixels=True)\n"
    "next(it); it.close()\n"
    "assert 'tensorflow' not in sys.modules, 'numpy pipeline imported TensorFlow'\n"
  )
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  # Prepend the repository, keeping any PYTHONPATH the environment needs for its packages.
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)


def test_eval_dataset(syn_root):
  cfg = synthetic_config(syn_root)
  ds = pipeline.make_eval_dataset(cfg, "val", superpixels=True, clusters=True, max_images=5)
  assert len(ds) == 5
  items = list(ds)
  assert [it["index"] for it in items] == list(range(5))
  split = sources.get_dataset(cfg).split("val")
  sp_paths = split.superpixel_paths(str(syn_root / "Superpixels_skimage_100"))
  cl_paths = split.superpixel_paths(str(syn_root / "Superpixels_skimage_100" / "clusters_k8"))
  for it in items:
    assert it["image"].shape == (96, 96, 3) and it["mask"].shape == (96, 96)
    assert it["superpixels"].dtype == np.int32
    np.testing.assert_array_equal(it["superpixels"], files.read_superpixels(sp_paths[it["index"]]))
    np.testing.assert_array_equal(it["clusters"], files.read_clusters(cl_paths[it["index"]]))
    np.testing.assert_array_equal(it["labels"], dataset.mask_labels(it["mask"], 7))
    assert it["id"] == split.ids[it["index"]]
  assert len(pipeline.make_eval_dataset(cfg, "val", superpixels=True)) == 8
  no_sp = pipeline.make_eval_dataset(cfg, "val", superpixels=False)[0]
  for key in ("superpixels", "clusters"):
    assert no_sp[key].dtype == np.int32 and not no_sp[key].any()


@pytest.mark.parametrize("max_images", [0, 5])
def test_eval_hosts_take_disjoint_slices_covering_the_split(syn_root, max_images):
  cfg = synthetic_config(syn_root)
  whole = pipeline.make_eval_dataset(cfg, "val", superpixels=False, max_images=max_images)
  n = len(whole)
  by_index = {it["index"]: it for it in whole}
  for count in (2, 3):
    parts = [
      pipeline.make_eval_dataset(
        cfg,
        "val",
        superpixels=False,
        max_images=max_images,
        process_index=p,
        process_count=count,
      )
      for p in range(count)
    ]
    got = [[it["index"] for it in part] for part in parts]
    assert got == [list(range(p, n, count)) for p in range(count)]  # Strided, in order.
    assert sorted(sum(got, [])) == list(range(n))  # Disjoint and covering.
    for part in parts:
      for it in part:
        want = by_index[it["index"]]
        assert it["id"] == want["id"]
        np.testing.assert_array_equal(it["image"], want["image"])
  again = pipeline.make_eval_dataset(
    cfg, "val", superpixels=False, process_index=1, process_count=3
  )
  assert again.indices == (1, 4, 7)  # Deterministic: a function of (index, count) only.
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_eval_dataset(cfg, "val", superpixels=False, process_index=2, process_count=2)


@pytest.fixture(scope="module")
def train_sp_only(tmp_path_factory):
  """A synthetic dataset with superpixels for its train split only (none for val)."""
  root = tmp_path_factory.mktemp("train_sp_only")
  synthetic.write_dataset(str(root), num_train=4, num_val=3, size=48, seed=1)
  cfg = synthetic_config(root, crop_size=32)
  assert not superpixels.precompute(cfg, "train", workers=1, progress=False)["problems"]
  return root


def test_required_superpixels_missing_name_folder_and_command(train_sp_only):
  cfg = synthetic_config(train_sp_only, crop_size=32)
  folder = str(train_sp_only / "Superpixels_skimage_100")
  with pytest.raises(DataError) as e:
    pipeline.make_eval_dataset(cfg, "val", superpixels=True)
  msg = str(e.value)
  assert "3 of 3 superpixel files for split 'val' are missing" in msg
  assert superpixels.command(cfg, "val") in msg and "--split val" in msg
  # The train split is complete; removing one file makes the iterator refuse to start.
  take(cfg, 1, batch_size=2, seed=0, pipeline="numpy")
  os.rename(os.path.join(folder, "train_00002.png"), os.path.join(folder, "moved.png"))
  try:
    with pytest.raises(DataError, match=r"(?s)1 of 4 .*train_00002\.png.*--split train"):
      take(cfg, 1, batch_size=2, seed=0, pipeline="numpy")
  finally:
    os.rename(os.path.join(folder, "moved.png"), os.path.join(folder, "train_00002.png"))


def test_required_superpixels_without_folder(tmp_path):
  synthetic.write_dataset(str(tmp_path), num_train=2, num_val=2, size=32, seed=0)
  cfg = synthetic_config(tmp_path, crop_size=32)
  folder = str(tmp_path / "Superpixels_skimage_100")
  for make in (
    lambda: take(cfg, 1, batch_size=2, seed=0, pipeline="numpy"),
    lambda: pipeline.make_eval_dataset(cfg, "val", superpixels=True),
  ):
    with pytest.raises(DataError, match=f"superpixel folder {folder} does not exist") as e:
      make()
    assert "python -m ssr_jax.data.superpixels --config configs/demo.py" in str(e.value)


def test_superpixels_off_reads_no_superpixel_file(syn_root, monkeypatch):
  def fail(path):
    raise AssertionError(f"read {path}")

  monkeypatch.setattr(files, "read_superpixels", fail)
  cfg = synthetic_config(syn_root)
  take(cfg, 2, batch_size=4, seed=0, pipeline="numpy", superpixels=False)
  assert len(list(pipeline.make_eval_dataset(cfg, "val", superpixels=False))) == 8


def test_unlabeled_images_skipped_with_count(tmp_path, caplog):
  from tests.data.conftest import data_config, random_image, write_voc_tree

  rng = np.random.default_rng(0)
  masks = [np.full((20, 30), v, np.uint8) for v in (0, 3, 0, 255, 15)]
  lst = write_voc_tree(tmp_path, [random_image(rng, 20, 30) for _ in masks], masks)
  cfg = data_config(name="voc", root=str(tmp_path), train_split=lst, crop_size=16)
  with caplog.at_level(logging.WARNING):
    split = sources.get_dataset(cfg).split(lst, drop_unlabeled=True)
  assert split.ids == ("im1", "im4")
  assert "skipping 3 of 5 images" in caplog.text
  (batch,) = take(cfg, 1, batch_size=2, seed=0, pipeline="numpy", superpixels=False)
  assert sorted(batch["labels"].argmax(1).tolist()) == [2, 14]


def test_superpixels_without_clusters_are_refused_with_the_command(tmp_path):
  synthetic.write_dataset(str(tmp_path), num_train=3, num_val=2, size=32, seed=2)
  cfg = synthetic_config(tmp_path, crop_size=32)
  assert not superpixels.precompute(cfg, "train", workers=1, progress=False)["problems"]
  folder = tmp_path / "Superpixels_skimage_100"
  clusters = folder / "clusters_k8"
  for f in clusters.iterdir():  # A folder from before colour clusters: superpixels only.
    f.unlink()
  clusters.rmdir()
  take(cfg, 1, batch_size=2, seed=0, pipeline="numpy")  # Superpixels alone still work.
  with pytest.raises(DataError) as e:
    take(cfg, 1, batch_size=2, seed=0, pipeline="numpy", clusters=True)
  msg = str(e.value)
  assert f"superpixel folder {folder} has no colour clusters clusters_k8/" in msg
  assert superpixels.command(cfg, "train") in msg and "--config.data.color_clusters=8" in msg
  # The command adds the clusters from the stored superpixels and leaves those untouched.
  before = {f.name: f.stat().st_mtime_ns for f in folder.glob("*.png")}
  out = superpixels.precompute(cfg, "train", workers=1, progress=False)
  assert out["written"] == 3 and not out["problems"]
  assert before == {f.name: f.stat().st_mtime_ns for f in folder.glob("*.png")}
  take(cfg, 1, batch_size=2, seed=0, pipeline="numpy", clusters=True)
  os.remove(clusters / "train_00001.png")
  with pytest.raises(DataError, match=r"(?s)1 of 3 colour-cluster files .*train_00001\.png"):
    pipeline.make_train_iterator(
      cfg,
      batch_size=2,
      seed=0,
      superpixels=False,
      clusters=True,
      process_index=0,
      process_count=1,
    )
  # Other clustering settings live in their own folder.
  other = synthetic_config(tmp_path, crop_size=32, color_clusters=4, cluster_position_weight=30.0)
  with pytest.raises(DataError, match="no colour clusters clusters_k4_p30/"):
    pipeline.make_eval_dataset(other, "train", superpixels=False, clusters=True)
