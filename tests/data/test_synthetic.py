"""Synthetic dataset: determinism, exact labels, the co-occurrence / background failure modes."""

import numpy as np
from scipy import ndimage

from ssr_jax.data import dataset, sources, synthetic
from tests.data.conftest import synthetic_config

S = synthetic.SPEC


def test_deterministic_and_subsettable():
  a = synthetic.generate(6, size=64, seed=3)
  b = synthetic.generate(6, size=64, seed=3)
  for k in ("image", "mask", "labels"):
    np.testing.assert_array_equal(a[k], b[k])
  assert a["caption"] == b["caption"] and a["id"] == b["id"]
  c = synthetic.generate(2, size=64, seed=3, start=4)
  np.testing.assert_array_equal(c["image"], a["image"][4:])
  assert c["id"] == a["id"][4:]
  assert not np.array_equal(synthetic.generate(6, size=64, seed=4)["image"], a["image"])
  v = synthetic.generate(6, size=64, seed=3, stream=1)
  assert v["id"][0] == "val_00000" and not np.array_equal(v["image"], a["image"])


def test_spec():
  assert S.num_classes == 7 and len(S.class_names) == 6 and len(set(S.palette)) == 7
  assert {"water", "grass", "sky", "sand", "road"} == set(S.bg_names)


def test_statistics_and_failure_modes():
  d = synthetic.generate(300, size=96, seed=0)
  np.testing.assert_array_equal(
    d["labels"], np.stack([dataset.mask_labels(m, S.num_classes) for m in d["mask"]])
  )
  assert d["image"].dtype == np.uint8 and d["image"].shape == (300, 96, 96, 3)
  lab = d["labels"].astype(bool)
  boat, horse, rider = lab[:, 0], lab[:, 1], lab[:, 2]
  water = np.array(["on water" in c for c in d["caption"]])
  # Rider only on a horse, touching it; most horses carry a rider.
  assert np.all(horse[rider])
  assert rider[horse].mean() > 0.6
  touching = [(ndimage.binary_dilation(m == 3) & (m == 2)).any() for m in d["mask"][rider]]
  assert np.mean(touching) > 0.95
  # Boat <-> water.
  assert water[boat].mean() > 0.8 and boat[water].mean() > 0.95
  # Every class appears; objects are large (median area 8-30% of the image).
  for v in range(1, 7):
    frac = (d["mask"] == v).mean(axis=(1, 2))
    frac = frac[frac > 0]
    assert len(frac) > 20, S.class_names[v - 1]
    assert 0.05 < np.median(frac) < 0.3, (S.class_names[v - 1], np.median(frac))
  # Captions name exactly the classes present, and the background.
  for c, row in zip(d["caption"], lab):
    assert {n for n in S.class_names if f"a {n}" in c} == {
      n for n, on in zip(S.class_names, row) if on
    }
    assert any(b in c for b in S.bg_names)


def test_write_read_roundtrip(tmp_path):
  root = str(tmp_path / "syn")
  assert synthetic.write_dataset(root, num_train=5, num_val=3, size=48, seed=1)
  assert not synthetic.write_dataset(root, num_train=5, num_val=3, size=48, seed=1)
  mem = synthetic.generate(5, size=48, seed=1)
  disk = synthetic.read_split(root, "train")
  for k in ("image", "mask", "labels", "caption", "id"):
    np.testing.assert_array_equal(np.asarray(disk[k]), np.asarray(mem[k]))
  cfg = synthetic_config(root)
  ds = sources.get_dataset(cfg)
  assert ds.class_names == S.class_names and ds.bg_names == S.bg_names
  assert len(ds.split("val")) == 3
  assert synthetic.write_dataset(root, num_train=4, num_val=3, size=48, seed=1)  # Changed spec.
  assert len(ds.split("train")) == 4
