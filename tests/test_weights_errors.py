"""Weights files that are not weights (random bytes, truncated, another model's): one line naming
the file, saying it is not a valid CLIP/DINO weights file, and listing the accepted formats.
No torch needed: a .pt/.pth of random bytes is refused by its first bytes."""

import zipfile

import numpy as np
import pytest

from configs import demo as demo_config
from ssr_jax import demo, experiment
from ssr_jax.clip import convert as clip_convert
from ssr_jax.dino import convert as dino_convert

RANDOM = np.random.default_rng(0).bytes(8192)
LOADERS = {
  "CLIP": (clip_convert.load_clip, clip_convert.ACCEPTED),
  "DINO": (dino_convert.load_dino, dino_convert.ACCEPTED),
}


def hf_dir(root, weights_name, data):
  root.mkdir()
  (root / "config.json").write_text("{}")  # transformers' defaults: the weights fail first.
  (root / weights_name).write_bytes(data)
  return root


def bad_files(tmp_path, what):
  """{case: (path given to the loader, the file the error must name)}."""
  (tmp_path / "random.npz").write_bytes(RANDOM)
  shipped = demo.SHIPPED_CLIP if what == "CLIP" else demo.SHIPPED_DINO
  data = shipped.read_bytes()
  (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
  np.savez(tmp_path / "foreign.npz", w=np.zeros(3))
  other = demo.SHIPPED_DINO if what == "CLIP" else demo.SHIPPED_CLIP
  pt = tmp_path / ("random.pt" if what == "CLIP" else "random.pth")
  pt.write_bytes(RANDOM)
  hf = hf_dir(tmp_path / "hf", "model.safetensors", RANDOM)
  cases = {
    name: (tmp_path / name, tmp_path / name)
    for name in ("random.npz", "truncated.npz", "foreign.npz")
  }
  cases |= {"other model": (other, other), "random torch": (pt, pt)}
  cases["hf safetensors"] = (hf, hf / "model.safetensors")
  if what == "CLIP":
    msgpack = hf_dir(tmp_path / "hf_flax", "flax_model.msgpack", RANDOM)
    cases["hf msgpack"] = (msgpack, msgpack / "flax_model.msgpack")
  return cases


@pytest.mark.parametrize("what", sorted(LOADERS))
def test_each_bad_weights_file_is_one_line_naming_it(tmp_path, what):
  load, accepted = LOADERS[what]
  for case, (given, named) in bad_files(tmp_path, what).items():
    with pytest.raises(ValueError) as e:
      load(given, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg, case
    assert msg.startswith(f"{named}: not a valid {what} weights file ("), (case, msg)
    assert msg.endswith(f"; accepted: {accepted}"), case
  assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_zip_that_is_not_a_checkpoint_still_needs_torch_to_tell(tmp_path):
  """Starting like a torch file (a zip), it goes to torch: without torch, the install line."""
  path = tmp_path / "archive.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("readme.txt", "not weights")
  try:
    import torch  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match=r"archive\.pt: reading an OpenAI \.pt checkpoint needs"):
      clip_convert.load_clip(path, cache_dir=tmp_path)
  else:
    with pytest.raises(ValueError, match=r"archive\.pt: not a valid CLIP weights file \(neither"):
      clip_convert.load_clip(path, cache_dir=tmp_path)


def test_start_up_names_the_config_key(tmp_path):
  (tmp_path / "clip.npz").write_bytes(RANDOM)
  (tmp_path / "dino.pth").write_bytes(RANDOM)
  config = demo_config.get_config()
  config.clip.weights = str(tmp_path / "clip.npz")
  with pytest.raises(experiment.UserError, match=r"^clip\.weights='.*clip\.npz': .*clip\.npz: not"):
    experiment.load_frozen(config)
  config.clip.weights = str(demo.SHIPPED_CLIP)
  config.dino.weights = str(tmp_path / "dino.pth")
  config.model.cam.dino_weight = 0.5
  with pytest.raises(experiment.UserError, match=r"^dino\.weights='.*dino\.pth': .*valid DINO"):
    experiment.load_frozen(config)
