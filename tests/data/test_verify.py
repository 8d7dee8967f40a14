"""The start-up data check (data.verify, check.verify_split): every bad file of the training
split in one DataError before the first batch, at "headers" (cheap) or "full" level."""

import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from ssr_jax.data import check, files, pipeline, sources
from ssr_jax.data.files import DataError
from tests.data.conftest import data_config, random_image, synthetic_config, write_voc_tree

SP = "Superpixels_skimage_100"


def train_source(cfg, **kw):
  return pipeline.open_train_source(
    cfg, batch_size=2, seed=0, process_index=0, process_count=1, **kw
  )


def truncate(path, fraction=0.6):
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * fraction)])


def bad_ids(message):
  return sorted(set(re.findall(r"train_\d{5}", message)))


@pytest.fixture
def syn_copy(syn_root, tmp_path):
  root = tmp_path / "syn"
  shutil.copytree(syn_root, root)
  return root


def test_headers_level_reports_every_bad_file_before_the_first_batch(syn_copy):
  truncate(syn_copy / "JPEGImages" / "train_00003.png")
  files.write_png(str(syn_copy / "SegmentationClass" / "train_00005.png"), np.ones((90, 96), "u1"))
  Image.new("RGB", (96, 96)).save(syn_copy / "SegmentationClass" / "train_00006.png")
  files.write_png(str(syn_copy / SP / "train_00007.png"), np.ones((96, 95), np.uint16))
  files.write_png(str(syn_copy / SP / "clusters_k8" / "train_00009.png"), np.ones((9, 9), "u1"))
  cfg = synthetic_config(syn_copy)
  with pytest.raises(DataError) as e:
    train_source(cfg, superpixels=True, clusters=True)
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("data.verify=headers: 5 problem(s) in the 24 examples of split 'train'")
  # The first three problems are quoted in split order, the rest counted.
  assert bad_ids(msg.split("; and ")[0]) == ["train_00003", "train_00005", "train_00006"]
  assert "; and 2 more." in msg and "python -m ssr_jax.data.check" in msg
  assert "train_00003.png (image file is truncated)" in msg
  assert "train_00005.png is 90x96 but image" in msg and "mode 'RGB'" in msg
  # Maps are checked only when training reads them.
  with pytest.raises(DataError, match=r"^data.verify=headers: 3 problem\(s\)"):
    train_source(cfg, superpixels=False)
  cfg.verify = "none"
  source = train_source(cfg, superpixels=True, clusters=True)
  assert len(source.split) == 24


def test_every_problem_is_listed_by_the_check_command_too(syn_copy):
  truncate(syn_copy / "JPEGImages" / "train_00001.png")
  files.write_png(str(syn_copy / SP / "train_00002.png"), np.ones((96, 95), np.uint16))
  r = check.check_split(synthetic_config(syn_copy), "train", workers=2)
  assert [bad_ids(p) for p in r.problems[:2]] == [["train_00001"], ["train_00002"]]
  assert "is 96x95 but image" in r.problems[1]


def test_full_level_decodes_what_headers_cannot_see(tmp_path):
  rng = np.random.default_rng(0)
  bad_values = np.ones((20, 20), np.uint8)
  bad_values[0, 0] = 30
  labels = tmp_path / "labels.txt"
  labels.write_text("im0 1\nim1 1\n")
  lst = write_voc_tree(
    tmp_path, [random_image(rng, 20, 20)] * 2, [np.ones((20, 20), "u1"), bad_values]
  )
  cfg = data_config(name="voc", root=str(tmp_path), train_split=lst, labels_file=str(labels))
  train_source(cfg, superpixels=False)  # Headers: the mask is a valid 20x20 PNG.
  cfg.verify = "full"
  with pytest.raises(
    DataError, match=r"1 problem\(s\).*im1\.png has values \[30\] outside 0\.\.20"
  ):
    train_source(cfg, superpixels=False)


def test_truncated_jpeg_found_by_its_missing_end_marker_and_trailing_bytes_accepted(tmp_path):
  rng = np.random.default_rng(1)
  image = random_image(rng, 64, 64)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=95)
  jpeg = buf.getvalue()
  # A complete JPEG followed by 5 KiB of padding (past the tail searched for the end marker):
  # decoded in full on suspicion, and accepted as training would accept it.
  padded = jpeg + bytes(5000)
  masks = [np.ones((64, 64), np.uint8)] * 3
  lst = write_voc_tree(tmp_path, [jpeg, padded, jpeg[: len(jpeg) * 2 // 3]], masks)
  cfg = data_config(name="voc", root=str(tmp_path), train_split=lst)
  with pytest.raises(DataError, match=r"1 problem\(s\) in the 3 examples.*im2\.jpg.*truncated"):
    train_source(cfg, superpixels=False)
  # The header alone reads fine: only the end marker shows the truncation.
  with Image.open(tmp_path / "JPEGImages" / "im2.jpg") as im:
    assert im.size == (64, 64)


def test_tfds_records_are_checked_too(syn_root, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from ssr_jax.data import records, tfds_build

  cfg = synthetic_config(syn_root, tfds_data_dir=str(tmp_path / "tfds"))
  tfds_build.build(cfg, ["train"], superpixels=False, workers=1, shard_size=8)
  tcfg = cfg.copy_and_resolve_references()
  tcfg.source = "tfds"
  split, store = sources.open_split(tcfg, "train", superpixels=False)
  check.verify_split(split, store, level="full", workers=2)  # A sound build passes.
  shard = sorted(records.build_dir(tcfg, maps=False).glob("*train.array_record-00002-of-00003"))
  truncate(shard[0], 0.3)
  with pytest.raises(DataError) as e:
    train_source(tcfg, superpixels=False)
  msg = str(e.value)
  assert re.match(r"data.verify=headers: \d+ problem\(s\) in the 24 examples", msg)
  assert "cannot read record" in msg and "rebuild it with python -m ssr_jax.data.tfds_build" in msg
