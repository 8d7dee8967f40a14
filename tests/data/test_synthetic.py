"""Synthetic dataset: determinism, exact labels, the co-occurrence / background failure modes."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from configs import base
from ssr_jax.data import dataset, sources, synthetic
from ssr_jax.data.files import DataError
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


# ----------------------------------------------------------------------------- the dials

# sha256 of generate(16, size=96, seed=0) (image, mask bytes, captions) for streams 0, 1 and the
# tiny CLIP's decorrelated stream 2, taken before the dials existed: the default World must keep
# the shipped encoders' data and the demo's numbers.
_DIGESTS = {
  (0, 0, False): "4556c881cb19435fb805a1c43746e19f7ab1793d7179ca29d26d247fe256eacd",
  (0, 1, False): "ec42b4345dd58bdc2ce067bcc389d74885374b9090a64e57f7bfb3fd3ad98d98",
  (1000, 2, True): "eb741a04b1dd566267c5ae7516b6bcd2782fc8f3943c53d9ef49a361ef680992",
}


def test_default_world_reproduces_the_data_made_before_the_dials():
  for (seed, stream, decorrelated), want in _DIGESTS.items():
    d = synthetic.generate(16, size=96, seed=seed, stream=stream, decorrelated=decorrelated)
    h = hashlib.sha256()
    for k in ("image", "mask"):
      h.update(np.ascontiguousarray(d[k]).tobytes())
    h.update("\n".join(d["caption"]).encode())
    assert h.hexdigest() == want, (seed, stream)


# Base colours of the backgrounds (synthetic._background), the pixel oracle of the scene.
_BG_RGB = {"water": (25, 75, 165), "grass": (55, 140, 45), "sky": (130, 185, 235)}
_BG_RGB.update(sand=(215, 190, 135), road=(95, 95, 100))


def _background_from_pixels(image, mask):
  """The background's name from the median colour of its pixels (nearest base colour)."""
  med = np.median(image[mask == 0].astype(np.float64), axis=0)
  names = list(_BG_RGB)
  return names[int(np.argmin([np.linalg.norm(med - _BG_RGB[n]) for n in names]))]


def _close(k, n, p):
  """k successes of n within 4 binomial standard deviations (+ one count) of rate p."""
  assert n >= 40, f"only {n} trials"
  return abs(k / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1 / n


def test_dials_set_the_measured_co_occurrence():
  world = synthetic.World(
    rider_on_horse=0.3,
    rider_alone=0.25,
    boat_on_water=0.5,
    car_on_road=0.3,
    bird_in_sky=0.55,
    water_without_boat=0.2,
  )
  d = synthetic.generate(700, size=48, seed=5, world=world)
  lab = d["labels"].astype(bool)
  bg = np.array([_background_from_pixels(i, m) for i, m in zip(d["image"], d["mask"])])
  assert np.mean(bg == np.array(d["background"])) > 0.98  # The pixels show the scene's record.
  water, boat, horse, rider = bg == "water", lab[:, 0], lab[:, 1], lab[:, 2]
  # Backgrounds: a boat's scene is on water at boat_on_water; any other scene at
  # water_without_boat, else on its own background at its rate.
  assert _close(water[boat].sum(), boat.sum(), 0.5)
  assert _close(water[~boat].sum(), (~boat).sum(), 0.2)
  for c, home, rate in ((3, "road", 0.3), (4, "sky", 0.55)):  # Only cars / only birds.
    only = lab[:, c] & (lab.sum(1) == 1)
    assert _close((bg[only] == home).sum(), only.sum(), rate * (1 - 0.2)), home
  # Riders: in images with one horse group (carrying a rider or not) or lone rider, the mask
  # shows a horse with a rider, a horse alone, or a rider alone at the dials' rates.
  one = np.array(
    [sum(g in ("horse", "horse+rider", "rider") for g in gs) == 1 for gs in d["groups"]]
  )
  n = one.sum()
  assert _close((horse & rider)[one].sum(), n, (1 - 0.25) * 0.3)
  assert _close((horse & ~rider)[one].sum(), n, (1 - 0.25) * (1 - 0.3))
  assert _close((rider & ~horse)[one].sum(), n, 0.25)
  # The default world: a rider always on a horse, water nearly always with a boat.
  dd = synthetic.generate(300, size=48, seed=5)
  ld = dd["labels"].astype(bool)
  assert np.all(ld[ld[:, 2], 1])
  wd = np.array(dd["background"]) == "water"
  assert ld[wd, 0].mean() > 0.95


def test_world_out_of_range_is_named():
  with pytest.raises(ValueError, match=r"data\.synthetic\.rider_on_horse=1\.5"):
    synthetic.World(rider_on_horse=1.5)
  cfg = base.get_config().data.synthetic
  with pytest.raises(DataError, match=r"data\.synthetic\.boat_on_water=-0\.1"):
    cfg.boat_on_water = -0.1
    synthetic.world_from_config(cfg)


def test_a_changed_world_is_recorded_and_rewritten(tmp_path):
  root = str(tmp_path / "syn")
  assert synthetic.write_dataset(root, num_train=3, num_val=2, size=48, seed=1)
  assert "world" not in json.loads((tmp_path / "syn" / "spec.json").read_text())
  world = synthetic.World(rider_on_horse=1.0)
  assert synthetic.write_dataset(root, num_train=3, num_val=2, size=48, seed=1, world=world)
  spec = json.loads((tmp_path / "syn" / "spec.json").read_text())
  assert spec["world"] == {"rider_on_horse": 1.0}
  assert not synthetic.write_dataset(root, num_train=3, num_val=2, size=48, seed=1, world=world)
  mem = synthetic.generate(3, size=48, seed=1, world=world)
  np.testing.assert_array_equal(synthetic.read_split(root, "train")["image"], mem["image"])


def test_readme_dials_command(tmp_path):
  """The README's command, as written: a world where riders always ride and 30% stand alone."""
  cmd = "-m ssr_jax.data.synthetic --out runs/world --rider-on-horse 1.0 --rider-alone 0.3"
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
  )
  subprocess.run([sys.executable, *cmd.split()], cwd=tmp_path, env=env, check=True)
  spec = json.loads((tmp_path / "runs" / "world" / "spec.json").read_text())
  assert spec["world"] == {"rider_on_horse": 1.0, "rider_alone": 0.3}
  assert spec["num_train"] == 512 and spec["size"] == 128
  bad = subprocess.run(
    [sys.executable, *cmd.split(), "--boat-on-water", "2"],
    cwd=tmp_path,
    env=env,
    text=True,
    capture_output=True,
  )
  assert bad.returncode == 2 and "--boat-on-water=2.0: a probability" in bad.stderr
