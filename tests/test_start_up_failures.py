"""Bad data and bad weights stop `python launch.py` at start-up, as a user runs it: exit status
1, one `error:` line naming the files, no traceback, no checkpoint or log written, within a time
bound. (Config errors: tests/test_config_check.py.)"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import demo as demo_config
from ssr_jax import demo
from ssr_jax.data import files, superpixels, synthetic

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(num_train=16, num_val=4, image_size=32)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  """The demo's data (its superpixel settings) at a tiny size, already prepared, so that
  demo.prepare only checks it."""
  config = demo_config.get_config()
  data = config.data
  data.root = str(tmp_path_factory.mktemp("demo_data"))
  synthetic.write_dataset(data.root, num_train=16, num_val=4, size=32, seed=0)
  for split in ("train", "val"):
    assert not superpixels.precompute(data, split, workers=1, progress=False)["problems"]
  return Path(data.root)


def launch(workdir, root, *overrides):
  """launch.py --mode train on the demo config over the folders at root (16 images)."""
  args = [f"--config.data.synthetic.{k}={v}" for k, v in SIZES.items()]
  args += [
    f"--config.data.root={root}",
    "--config.data.source=files",
    "--config.train.num_steps=4",
    f"--config.clip.weights={demo.SHIPPED_CLIP}",
    f"--config.dino.weights={demo.SHIPPED_DINO}",
  ]
  cmd = [sys.executable, "launch.py", "--config", "configs/demo.py", "--workdir", str(workdir)]
  cmd += ["--mode", "train", *args, *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)


def assert_stopped_before_training(r, workdir):
  assert r.returncode == 1, r.stderr
  assert "Traceback" not in r.stderr
  assert list(workdir.iterdir()) == []  # No checkpoint, no log: nothing but the empty folder.
  return r.stderr.strip().splitlines()[-1]


def test_bad_images_and_masks_stop_the_run_before_step_1(demo_data, tmp_path):
  root = tmp_path / "data"
  shutil.copytree(demo_data, root)
  image = root / "JPEGImages" / "train_00003.png"
  image.write_bytes(image.read_bytes()[: image.stat().st_size * 6 // 10])
  files.write_png(str(root / "SegmentationClass" / "train_00005.png"), np.ones((30, 32), "u1"))
  r = launch(tmp_path / "run", root)
  line = assert_stopped_before_training(r, tmp_path / "run")
  assert line.startswith("error: data.verify=headers: 2 problem(s) in the 16 examples of split")
  assert f"image {image} (image file is truncated)" in line
  assert "train_00005.png is 30x32 but image" in line


def test_random_bytes_as_clip_weights_stop_the_run_before_step_1(demo_data, tmp_path):
  weights = tmp_path / "clip.npz"
  weights.write_bytes(np.random.default_rng(0).bytes(4096))
  r = launch(tmp_path / "run", demo_data, f"--config.clip.weights={weights}")
  line = assert_stopped_before_training(r, tmp_path / "run")
  assert line.startswith(f"error: clip.weights='{weights}': {weights}: not a valid CLIP weights")
  assert line.endswith("an .npz converted by ssr_jax")
