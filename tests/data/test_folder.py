"""The folder dataset (folder.py) against the synthetic reader, its checks, splits and config."""

import csv
import shutil

import numpy as np
import pytest
from conftest import synthetic_config, write_voc_tree
from PIL import Image
from test_pipeline import assert_batches_equal, take

from configs import demo
from configs import folder as folder_config
from ssr_jax.data import (
  check,
  files,
  folder,
  make_folder,
  pipeline,
  sources,
  superpixels,
  synthetic,
  voc,
)
from ssr_jax.data.files import DataError

MAPS = dict(superpixels=True, clusters=True)


def folder_cfg(root, **kw):
  cfg = synthetic_config(root, name="folder", num_classes=0, **kw)
  return cfg


@pytest.fixture(scope="module")
def shapes(syn_root, tmp_path_factory):
  """(synthetic config, folder config) of the session's synthetic set converted to a folder,
  with its own superpixels computed from the folder."""
  out = tmp_path_factory.mktemp("folder") / "shapes"
  counts = make_folder.convert("synthetic", str(syn_root), str(out), ["train", "val"])
  assert counts == {"train": 24, "val": 8}
  cfg = folder_cfg(out)
  for split in ("train", "val"):
    assert not superpixels.precompute(cfg, split, workers=1, progress=False)["problems"]
  return synthetic_config(syn_root), cfg


def test_layout_written_by_the_converter(shapes, syn_root):
  _, cfg = shapes
  root = cfg.root
  rows = list(csv.reader(open(f"{root}/labels.csv")))
  assert rows[0] == ["image", "labels", "split"] and len(rows) == 33
  assert rows[1][0] == "train_00000.png" and rows[-1][2] == "val"
  assert open(f"{root}/classes.txt").read().split() == list(synthetic.SPEC.class_names)
  # Byte-for-byte copies.
  a = (syn_root / "JPEGImages" / "val_00003.png").read_bytes()
  assert a == open(f"{root}/images/val_00003.png", "rb").read()
  # The labels: the synthetic labels file's, by name.
  want = synthetic.read_split(str(syn_root), "train")["labels"][0]
  names = [synthetic.SPEC.class_names[c] for c in np.flatnonzero(want)]
  assert rows[1][1] == ";".join(names)


@pytest.mark.parametrize("pipe", ["numpy", "tf"])
def test_batches_bit_identical_to_the_synthetic_reader(shapes, pipe):
  if pipe == "tf":
    pytest.importorskip("tensorflow")
  syn, fol = shapes
  kw = dict(batch_size=4, seed=3, pipeline=pipe, **MAPS)
  want = take(syn, 8, **kw)  # 32 examples: past one epoch of the 24 training images.
  assert_batches_equal(take(fol, 8, **kw), want)
  assert (want[0]["superpixels"] > 0).any() and (want[0]["mask"] < 255).any()


def test_eval_items_identical(shapes):
  syn, fol = shapes
  got = list(pipeline.make_eval_dataset(fol, "val", **MAPS))
  want = list(pipeline.make_eval_dataset(syn, "val", **MAPS))
  assert [g["id"] for g in got] == [w["id"] for w in want]
  for g, w in zip(got, want):
    for k in ("image", "mask", "labels", "superpixels", "clusters", "index"):
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_tfds_build_of_the_folder_gives_the_same_batches(shapes, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from ssr_jax.data import records, tfds_build

  syn, fol = shapes
  fol = fol.copy_and_resolve_references()
  fol.tfds_data_dir = str(tmp_path)
  tfds_build.build(fol, ["train", "val"], superpixels=True, workers=1, shard_size=16)
  tcfg = fol.copy_and_resolve_references()
  tcfg.source, tcfg.root = "tfds", ""
  fields = sources.dataset_fields(tcfg)
  assert fields["num_classes"] == 7 and fields["bg_names"] == synthetic.SPEC.bg_names
  assert fields["prompts"] == synthetic.SPEC.class_names
  tcfg.num_classes = 7
  for pipe in ("numpy", "tf"):
    kw = dict(batch_size=4, seed=1, pipeline=pipe, **MAPS)
    assert_batches_equal(take(tcfg, 7, **kw), take(syn, 7, **kw))
  assert records.class_names(tcfg) == synthetic.SPEC.class_names


def test_configure_reads_classes_prompts_and_max_classes(shapes):
  _, fol = shapes
  config = folder_config.get_config("tiny")
  config.data.root = fol.root
  got = sources.configure(config)
  want = demo.get_config()
  assert got.data.num_classes == want.data.num_classes == 7
  assert got.model.class_names == want.model.class_names
  assert got.model.bg_names == want.model.bg_names
  rows = list(csv.DictReader(open(f"{fol.root}/labels.csv")))
  assert got.model.max_classes == max(len(r["labels"].split(";")) for r in rows)
  config.model.max_classes = 3  # A set value is kept.
  assert sources.configure(config).model.max_classes == 3
  assert sources.configure(got) == got  # Idempotent.
  config.model.class_names = ("boat",)
  with pytest.raises(DataError, match="model.class_names is set.*classes.txt"):
    sources.configure(config)


def _tiny_folder(root, rows, classes=("cat", "dog"), size=(20, 30)):
  (root / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for r in rows:
    if not r[0].startswith("missing"):
      path = root / "images" / r[0]
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(path)
  with open(root / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([["image", "labels", "split"], *rows])
  (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
  return root


def test_every_bad_input_named_in_one_error_before_anything_runs(tmp_path):
  root = _tiny_folder(
    tmp_path / "bad",
    [
      ["a.jpg", "cat", "train"],
      ["sub/b.png", "hrose;dog", "train"],  # Unknown class.
      ["a.jpg", "dog", "train"],  # Duplicate row.
      ["missing.jpg", "cat", "train"],  # No such image.
      ["broken.jpg", "cat", "train"],  # Unreadable.
      ["c.png", "", "train"],  # No labels: skipped by training, not a problem.
      ["d.png", "cat", "val"],
      ["e.png", "cat", "val"],
    ],
    classes=("cat", "dog", "horse", "bird"),
  )
  (root / "images/broken.jpg").write_bytes(b"not a jpeg")
  files.write_png(str(root / "masks/d.png"), np.zeros((21, 30), np.uint8))  # Wrong size.
  files.write_png(str(root / "masks/e.png"), np.full((20, 30), 9, np.uint8))  # Value 9 > 4.
  cfg = folder_cfg(root)
  with pytest.raises(DataError) as e:
    sources.get_dataset(cfg)
  msg = str(e.value)
  for want in (
    "line 3: unknown class 'hrose'; nearest: horse",
    "line 4: duplicate row for a.jpg (first on line 2)",
    "line 5: image not found",
    "line 6: cannot read image",
    "masks/d.png is 21x30 but its image is 20x30",
    "masks/e.png has values [9] outside 0..4",
    "class 'horse'",  # In no training image (its only row has a typo).
    "class 'bird'",
    "nothing was run or written",
  ):
    assert want in msg, (want, msg)
  assert "c.png" not in msg
  assert msg.count("\n  ") == 8  # Every problem listed, each once.
  # launch.py's path: the error surfaces before the workdir gets anything.
  from ssr_jax import experiment

  config = folder_config.get_config()
  config.data.root = str(root)
  work = tmp_path / "work"
  with pytest.raises(experiment.UserError, match="8 problem"):
    experiment.run("train", config, str(work))
  assert not work.exists()  # Not even the workdir.


def test_text_file_problems(tmp_path):
  root = _tiny_folder(tmp_path / "t", [["a.jpg", "cat", "train"], ["b.jpg", "dog", "val"]])
  (root / "classes.txt").write_text("cat\ndog\ncat\n")
  (root / "background.txt").write_text("grass\ndog, hound\n")
  with pytest.raises(DataError) as e:
    folder.open_dataset(str(root))
  assert "classes.txt line 3: class 'cat' repeats line 1" in str(e.value)
  assert "background.txt line 2: dog is also a class" in str(e.value)
  (root / "labels.csv").write_text("file,tags\na.jpg,cat\n")
  (root / "classes.txt").write_text("cat\n")
  (root / "background.txt").unlink()
  with pytest.raises(DataError, match="header file,tags has no column image or labels"):
    folder.open_dataset(str(root))


def test_prompts_synonyms_and_default_background(tmp_path):
  root = _tiny_folder(
    tmp_path / "p",
    [["a.jpg", "person;tree", "train"], ["b.jpg", "bird", "val"], ["c.jpg", "people", "val"]],
    classes=("person: person with clothes, people,human", "bird avian,bird", "tree"),
  )
  with pytest.raises(DataError, match="'people' is a prompt of class 'person'; label it 'person'"):
    folder.open_dataset(str(root))
  (root / "labels.csv").write_text(
    "image,labels,split\na.jpg,person;tree,train\nb.jpg,bird avian,train\nc.jpg,,val\n"
  )
  ds = folder.open_dataset(str(root), train_split="train")
  assert ds.class_names == ("person", "bird avian", "tree")
  assert ds.prompts == ("person with clothes,people,human", "bird avian,bird", "tree")
  assert "tree" not in ds.bg_names and "grass" in ds.bg_names
  assert set(ds.bg_names) == set(folder.DEFAULT_BG) - {"tree"}
  s = ds.split("val")  # An unlabeled image: kept for evaluation, dropped by training.
  assert s.labels.sum() == 0 and s.mask_paths == ("",)
  with pytest.raises(DataError, match="no image has a foreground label"):
    ds.split("val", drop_unlabeled=True)


def test_holdout_is_stable_seeded_and_order_free(tmp_path):
  paths = [f"dir{i % 3}/img_{i:03d}.jpg" for i in range(40)]
  held = folder.holdout(paths, 0.1, 0)
  assert len(held) == 4
  assert held == folder.holdout(list(reversed(paths)), 0.1, 0)  # Row order does not matter.
  # Pinned (sha256 of "0/<path>", lowest four): the same on every host and Python, whatever
  # PYTHONHASHSEED (no hash()).
  pinned = ["dir0/img_006.jpg", "dir0/img_021.jpg", "dir2/img_008.jpg", "dir2/img_026.jpg"]
  assert sorted(held) == pinned
  assert folder.holdout(paths, 0.1, 1) != held
  assert (
    len(folder.holdout(paths[:1], 0.5, 0)) == 0 and len(folder.holdout(paths[:3], 0.01, 0)) == 1
  )
  # Adding an image moves at most one other.
  assert len(held - folder.holdout(paths + ["new.jpg"], 0.1, 0)) <= 1


def test_holdout_split_and_masks_on_a_subset(shapes, tmp_path):
  _, fol = shapes
  root = tmp_path / "noslit"
  shutil.copytree(fol.root, root, ignore=shutil.ignore_patterns("Superpixels_*"))
  rows = list(csv.reader(open(root / "labels.csv")))
  with open(root / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([r[:2] for r in rows])  # No split column.
  for p in sorted((root / "masks").iterdir())[::2]:
    p.unlink()  # Masks on every other image only.
  cfg = folder_cfg(root)
  cfg.folder.val_fraction = 0.25
  ds = sources.get_dataset(cfg)
  val, train = ds.split("val"), ds.split("train")
  held = folder.holdout([r[0] for r in rows[1:]], 0.25, 0)
  assert sorted(val.ids) == sorted(p[:-4] for p in held) and len(val) + len(train) == 32
  items = list(pipeline.make_eval_dataset(cfg, "val", superpixels=False))
  has = [(root / "masks" / f"{i}.png").exists() for i in val.ids]
  assert [it["mask"] is not None for it in items] == has and any(has) and not all(has)
  for it in items:
    if it["mask"] is not None:
      want = files.read_mask(str(root / "masks" / f"{it['id']}.png"), 7)
      np.testing.assert_array_equal(it["mask"], want)
  # Training batches: images without a mask have all-255 masks.
  (batch,) = take(cfg, 1, batch_size=8, seed=0, pipeline="numpy", superpixels=False)
  for i, m in zip(batch["index"], batch["mask"]):
    assert (m == 255).all() == (not train.mask_paths[i])


def test_check_reports_masks_unlisted_and_unlabeled(shapes, tmp_path):
  _, fol = shapes
  root = tmp_path / "chk"
  shutil.copytree(fol.root, root)
  shutil.copy(root / "images/val_00000.png", root / "images/extra.png")
  cfg = folder_cfg(root)
  r = check.check_split(cfg, "val", workers=1)
  assert r.total == 8 and r.masks == 8 and not r.problems and r.superpixel_dir
  assert any("1 image(s) under images/ have no row" in n for n in r.notes)


def test_voc_folder_converts(tmp_path):
  """A VOC-layout subset with palette masks, own split lists -> the folder layout: the same
  bytes, labels and WeCLIP's prompts; the classes no training image carries are named."""
  rng = np.random.default_rng(2)
  ids = ["2007_000032", "2007_000039", "2007_000063", "2008_000002"]
  images = [rng.integers(0, 255, (24, 32, 3), np.uint8) for _ in ids]
  masks = [rng.choice([0, 1, 15, 255], (24, 32)).astype(np.uint8) for _ in ids]
  masks[3][:] = 0  # No foreground: a row without labels.
  voc_root = tmp_path / "VOC2012"
  train = write_voc_tree(voc_root, images[:3], masks[:3], ids=ids[:3], list_name="mytrain.txt")
  val = write_voc_tree(voc_root, images[3:], masks[3:], ids=ids[3:], list_name="myval.txt")
  out = tmp_path / "voc_folder"
  assert make_folder.convert("voc", str(voc_root), str(out), [train, val]) == {
    "mytrain": 3,
    "myval": 1,
  }
  index, problems = folder.read_index(str(out), val_fraction=0.1, split_seed=0)
  assert not problems and index.class_names == voc.CLASSES
  assert (
    index.prompts[14] == "person with clothes,people,human" and index.prompts[2] == "bird avian"
  )
  assert "person: person with clothes,people,human" in (out / "classes.txt").read_text()
  got = {r.path: (r.labels, r.split) for r in index.rows}
  for i, m, split in zip(ids, masks, ["mytrain"] * 3 + ["myval"]):
    assert got[f"{i}.jpg"] == (tuple(v for v in (1, 15) if (m == v).any()), split)
    assert (out / "masks" / f"{i}.png").read_bytes() == (
      voc_root / f"SegmentationClassAug/{i}.png"
    ).read_bytes()
  cfg = folder_cfg(out, train_split="mytrain", val_split="myval")
  with pytest.raises(DataError, match="18 problem") as e:  # 20 classes, 2 of them in training.
    sources.get_dataset(cfg)
  assert "class 'aeroplane'" not in str(e.value) and "class 'bicycle'" in str(e.value)
