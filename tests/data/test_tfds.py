"""TFDS builds (tfds_build.py) and the tfds source (records.py) against the folder source."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import synthetic_config, write_voc_tree
from test_pipeline import assert_batches_equal, take

pytest.importorskip("tensorflow_datasets")  # Not on the GPU image (environment.md).

from ssr_jax.data import files, pipeline, records, tfds_build  # noqa: E402

MAPS = dict(superpixels=True, clusters=True)


def tfds_config(cfg):
  out = cfg.copy_and_resolve_references()
  out.source = "tfds"
  return out


@pytest.fixture(scope="module")
def built(syn_root, tmp_path_factory):
  """(folder config, tfds config) of the synthetic dataset, built with its maps, 3 shards."""
  cfg = synthetic_config(syn_root, tfds_data_dir=str(tmp_path_factory.mktemp("tfds")))
  tfds_build.build(cfg, ["train", "val"], superpixels=True, workers=2, shard_size=10)
  return cfg, tfds_config(cfg)


def batches(cfg, n, **kw):
  return take(cfg, n, **{"batch_size": 4, "seed": 3, **kw})


@pytest.mark.parametrize("pipe", ["numpy", "tf"])
@pytest.mark.parametrize("maps", [MAPS, dict(superpixels=False, clusters=True), {}])
def test_tfds_batches_equal_folder_batches(built, pipe, maps):
  cfg, tcfg = built
  kw = {"superpixels": False, **maps, "pipeline": pipe}
  want = batches(cfg, 8, **kw)  # 32 examples: past one epoch of the 24 training images.
  assert_batches_equal(batches(tcfg, 8, **kw), want)
  if maps.get("superpixels"):
    assert (want[0]["superpixels"] > 0).any()  # Real maps, not the valid-region layout.


def test_tfds_resume_and_hosts(built):
  _, tcfg = built
  kw = dict(superpixels=True, clusters=True, pipeline="numpy")
  whole = batches(tcfg, 5, **kw)
  assert_batches_equal(batches(tcfg, 2, start_step=3, **kw), whole[3:5])
  hosts = [batches(tcfg, 5, process_index=p, process_count=2, **kw) for p in (0, 1)]
  for step in range(5):
    joined = {k: np.concatenate([h[step][k] for h in hosts]) for k in whole[step]}
    assert_batches_equal([joined], [whole[step]])


def test_tfds_eval_items_equal_folder_items(built):
  cfg, tcfg = built
  want = list(pipeline.make_eval_dataset(cfg, "val", **MAPS))
  got = list(pipeline.make_eval_dataset(tcfg, "val", **MAPS))
  assert [g["id"] for g in got] == [w["id"] for w in want] and len(got) == 8
  for g, w in zip(got, want):
    for k in ("image", "mask", "labels", "superpixels", "clusters", "index"):
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_build_layout_is_a_tfds_dataset(built):
  cfg, tcfg = built
  build = records.build_dir(tcfg, maps=True)
  assert build.name == "1.0.0" and build.parent.name == "superpixels_skimage_100.clusters_k8"
  import tensorflow_datasets as tfds

  b = tfds.builder_from_directory(os.fspath(build))
  assert b.name == "ssr_synthetic" and b.info.splits["train"].num_shards == 3
  assert b.info.splits["train"].num_examples == 24
  rec = b.as_data_source("val")[2]  # Decoded by TFDS itself: the same arrays.
  split, _ = records.open_split(tcfg, "val", superpixels=False, clusters=False)
  folder = pipeline.make_eval_dataset(cfg, "val", **MAPS)[2]
  np.testing.assert_array_equal(rec["image"], folder["image"])
  np.testing.assert_array_equal(rec["mask"][..., 0], folder["mask"])
  np.testing.assert_array_equal(rec["superpixels"][..., 0], folder["superpixels"])
  np.testing.assert_array_equal(rec["labels"], folder["labels"])
  assert rec["id"].decode() == split.ids[2] == folder["id"]


def test_resume_rewrites_only_missing_shards(syn_root, tmp_path):
  cfg = synthetic_config(syn_root, tfds_data_dir=str(tmp_path))
  build = tfds_build.build(cfg, ["val"], superpixels=False, workers=1, shard_size=3)
  shards = sorted(p for p in os.listdir(build) if ".array_record-" in p)
  assert len(shards) == 3
  kept = build / shards[0]
  os.utime(kept, (1, 1))
  data = {p: (build / p).read_bytes() for p in shards}
  (build / shards[1]).unlink()
  (build / shards[2]).write_bytes(b"torn")
  tfds_build.build(cfg, ["val"], superpixels=False, workers=1, shard_size=3)
  assert os.stat(kept).st_mtime == 1
  assert {p: (build / p).read_bytes() for p in shards} == data


def test_bad_inputs_named_and_nothing_published(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, (20, 30, 3), np.uint8) for _ in range(3)]
  masks = [np.ones((20, 30), np.uint8) for _ in range(3)]
  lst = write_voc_tree(tmp_path / "voc", images, masks)
  jpeg = tmp_path / "voc/JPEGImages/im1.jpg"
  jpeg.write_bytes(jpeg.read_bytes()[:-200])  # Truncated: the header reads, the pixels do not.
  cfg = synthetic_config(tmp_path / "voc", name="voc", num_classes=21, train_split=lst)
  cfg.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(files.DataError, match=r"1 bad input[\s\S]*im1\.jpg"):
    tfds_build.build(cfg, [lst], superpixels=False, workers=1)
  with pytest.raises(files.DataError, match="no TFDS build plain or .* of voc.*tfds_build"):
    records.build_dir(tfds_config(cfg), maps=False)


def test_voc_style_folder_build(tmp_path):
  """A VOC-layout folder with palette masks, a list-file split (named after its stem)."""
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 255, (24, 32, 3), np.uint8) for _ in range(5)]
  masks = [rng.choice([0, 3, 15, 255], (24, 32)).astype(np.uint8) for _ in range(5)]
  masks[2][:] = 0  # No foreground: dropped from training, kept for eval.
  lst = write_voc_tree(tmp_path / "voc", images, masks, list_name="tiny.txt")
  cfg = synthetic_config(
    tmp_path / "voc", name="voc", num_classes=21, train_split=lst, crop_size=16
  )
  cfg.tfds_data_dir = str(tmp_path / "tfds")
  tfds_build.build(cfg, [lst], superpixels=False, workers=1)
  tcfg = tfds_config(cfg)
  meta = json.loads((records.build_dir(tcfg, maps=False) / "metadata.json").read_text())
  assert list(meta["splits"]) == ["tiny"] and len(meta["splits"]["tiny"]["ids"]) == 5
  kw = dict(superpixels=False, pipeline="numpy", batch_size=2)
  assert_batches_equal(batches(tcfg, 6, **kw), batches(cfg, 6, **kw))
  evals = [pipeline.make_eval_dataset(c, lst, superpixels=False) for c in (cfg, tcfg)]
  assert len(evals[1]) == 5
  for a, b in zip(*evals):
    np.testing.assert_array_equal(a["mask"], b["mask"])


def test_missing_split_and_corrupt_record(built, tmp_path):
  cfg, _ = built
  with pytest.raises(files.DataError, match="has no split 'test'.*--splits test"):
    pipeline.make_eval_dataset(tfds_config(cfg), "test", superpixels=False)
  # A copy of the build with one shard's bytes damaged: the error names the record.
  import shutil

  src = records.build_dir(tfds_config(cfg), maps=True)
  dst = tmp_path / "ssr_synthetic" / src.parent.name / "1.0.0"
  shutil.copytree(src, dst)
  shard = sorted(dst.glob("ssr_synthetic-val.array_record-*"))[0]
  data = bytearray(shard.read_bytes())
  data[len(data) // 3 : len(data) // 3 + 64] = b"\x00" * 64
  shard.write_bytes(bytes(data))
  bad = tfds_config(cfg)
  bad.tfds_data_dir = str(tmp_path)
  with pytest.raises(files.DataError, match=r"record \d+ of split val of the TFDS build.*rebuild"):
    list(pipeline.make_eval_dataset(bad, "val", **MAPS))


def test_tf_free_path_imports_no_tensorflow(built, tmp_path):
  """The numpy pipeline reads a TFDS build with TensorFlow hidden (as on hosts without it)."""
  _, tcfg = built
  want = batches(tcfg, 2, superpixels=True, clusters=True, pipeline="numpy")
  np.savez(
    tmp_path / "want.npz", **{f"{i}_{k}": v for i, b in enumerate(want) for k, v in b.items()}
  )
  script = textwrap.dedent(
    f"""
    import importlib.machinery as m, sys
    class Hide(m.PathFinder):  # As if TensorFlow were not installed.
      @classmethod
      def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
          return None
        return m.PathFinder.find_spec(name, path, target)
    sys.meta_path = [Hide if f is m.PathFinder else f for f in sys.meta_path]
    sys.path[:0] = [{os.path.dirname(__file__)!r}]
    import numpy as np
    from conftest import synthetic_config
    from ssr_jax.data import pipeline
    cfg = synthetic_config({tcfg.root!r}, tfds_data_dir={tcfg.tfds_data_dir!r}, source="tfds")
    cfg.worker_type = "thread"
    assert pipeline.resolve_pipeline("auto") == "numpy"
    it = pipeline.make_train_iterator(cfg, batch_size=4, seed=3, superpixels=True,
        clusters=True, process_index=0, process_count=1)
    want = np.load({str(tmp_path / "want.npz")!r})
    for i in range(2):
      b = next(it)
      for k, v in b.items():
        np.testing.assert_array_equal(v, want[f"{{i}}_{{k}}"])
    it.close()
    loaded = [n for n in sys.modules if n.split(".")[0] == "tensorflow"]
    assert not loaded, loaded
    print("ok")
    """
  )
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_builder_download_and_prepare_matches_the_command(built, tmp_path):
  """The TFDS builder's own serial build holds the same records as the parallel command."""
  cfg, tcfg = built
  import tensorflow_datasets as tfds

  b = tfds_build.SsrSynthetic(data_cfg=cfg, superpixels=True, data_dir=str(tmp_path))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=cfg.root))
  skip = {k: tfds.decode.SkipDecoding() for k in records.ENCODED}
  ours = records.data_source(os.fspath(records.build_dir(tcfg, maps=True)), "val")
  theirs = b.as_data_source("val", decoders=skip)
  assert len(theirs) == len(ours) == 8
  for k in range(8):
    a, c = ours[k], theirs[k]
    assert all(np.array_equal(a[f], c[f]) for f in a), k


def test_adding_a_split_keeps_the_others_and_changed_splits_are_rebuilt(syn_root, tmp_path):
  cfg = synthetic_config(syn_root, tfds_data_dir=str(tmp_path))
  build = tfds_build.build(cfg, ["val"], superpixels=False, workers=1, shard_size=4)
  tfds_build.build(cfg, ["train"], superpixels=False, workers=1, shard_size=4)
  tcfg = tfds_config(cfg)
  for split, n in (("val", 8), ("train", 24)):
    assert len(pipeline.make_eval_dataset(tcfg, split, superpixels=False)) == n
  import tensorflow_datasets as tfds

  assert set(tfds.builder_from_directory(os.fspath(build)).info.splits) == {"train", "val"}
  # A split whose ids or labels changed is rewritten whole, not resumed from its old shards
  # (simulated: the published ids no longer match the folders').
  meta = build / "metadata.json"
  m = json.loads(meta.read_text())
  m["splits"]["val"]["ids"] = m["splits"]["val"]["ids"][::-1]
  meta.write_text(json.dumps(m))
  shards = sorted(build.glob("ssr_synthetic-val.array_record-*"))
  for p in shards:
    os.utime(p, (1, 1))
  tfds_build.build(cfg, ["val"], superpixels=False, workers=1, shard_size=4)
  assert all(os.stat(p).st_mtime > 1 for p in shards)
  assert json.loads(meta.read_text())["splits"]["val"]["ids"] == m["splits"]["val"]["ids"][::-1]
