"""The README's "Your own data" commands, run as written in a subprocess; and a folder made from the
synthetic set trains exactly as the synthetic reader does."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from configs import demo as demo_config
from configs import folder as folder_config
from ssr_jax import experiment
from ssr_jax.data import make_folder, superpixels, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands(section: str) -> list[str]:
  """The lines of the ```bash blocks of a README section."""
  text = (ROOT / "README.md").read_text()
  body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```bash\n(.*?)```", body, re.S)
  return [line for b in blocks for line in b.splitlines() if line.strip()]


def test_readme_commands_run_as_written(tmp_path):
  cmds = readme_commands("Your own data")
  assert len(cmds) == 10 and all(c.startswith("python ") for c in cmds)
  # A user's checkout: the commands' relative paths (configs/, launch.py, data/, runs/) resolve
  # in a fresh folder that holds the repository's configs and launch.py.
  for name in ("configs", "launch.py"):
    os.symlink(ROOT / name, tmp_path / name)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # One CPU device, as a user's laptop.
  out = {}
  for cmd in cmds:
    argv = [sys.executable, *shlex.split(cmd)[1:]]  # Word splitting and quotes as a shell.
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out[cmd] = r.stdout
  train, evaluate = [c for c in cmds if "launch.py" in c]
  assert re.search(
    r"mIoU on val: clip_cam 0\.\d+  cam 0\.\d+  pseudo 0\.\d+  seg 0\.\d+", out[train]
  )
  # Without masks: no mIoU, the image-level mAPs.
  assert "mIoU on val: seg -  clip_cam -" in out[evaluate]
  assert re.search(r"image-level mAP on val: zero-shot CLIP 0\.\d+  seg 0\.\d+", out[evaluate])
  m = json.loads((tmp_path / "runs/shapes/eval/metrics_val_seg.json").read_text())
  assert m["miou"] is None and m["masked_images"] == 0 and m["num_images"] == 12
  assert 0 < m["zero_shot"]["map"] <= 1 and 0 < m["seg_classification"]["map"] <= 1
  assert (tmp_path / "predictions/val_00000.png").is_file()
  meta = tmp_path / "data/tfds/ssr_folder/superpixels_skimage_200.clusters_k4/1.0.0/metadata.json"
  meta = json.loads(meta.read_text())
  assert meta["prompts"] == list(synthetic.SPEC.class_names)
  assert meta["bg_names"] == list(synthetic.SPEC.bg_names)
  assert len(meta["splits"]["train"]["ids"]) == 48
  assert not (tmp_path / "data/tags/masks").exists()


def _small(config):
  config.data.synthetic.num_train = 24
  config.data.synthetic.num_val = 4
  config.data.source = "files"
  config.data.num_workers = 1
  config.model.max_classes = 3
  config.model.decoder.embed_dim = 16
  config.model.decoder.num_heads = 2
  config.model.cmpa.refresh_every = 2
  config.model.cmpa.bank_size = 32
  config.model.cam.par_iters = 2
  config.train.num_steps = 3
  config.train.checkpoint_every = 3
  config.train.warmup_steps = 1
  config.train.log_every = 1
  return config


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_folder_trains_as_the_synthetic_reader(tmp_path):
  """Same seed, same batches (tests/data/test_folder.py), same config: the same training, loss
  term for loss term at every step (evaluation reads the same eval items, also tested there)."""
  syn = _small(demo_config.get_config())
  # The shipped tiny DINO, as folder:tiny names it (the demo would otherwise check it against
  # this smaller training set and pretrain one).
  syn.dino.weights = fol_dino = folder_config.get_config("tiny").dino.weights
  experiment.run("train", syn, str(tmp_path / "syn"))
  make_folder.convert(
    "synthetic", str(tmp_path / "syn/data"), str(tmp_path / "folder"), ["train", "val"]
  )
  fol = _small(folder_config.get_config("tiny"))
  fol.data.root = str(tmp_path / "folder")
  assert fol.dino.weights == fol_dino and fol.model.cam.dino_weight == syn.model.cam.dino_weight
  superpixels.precompute(fol.data, "train", workers=1, progress=False)
  experiment.run("train", fol, str(tmp_path / "fol"))

  def logged(w):
    rows = [json.loads(x) for x in open(tmp_path / w / "train_metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.endswith("_per_sec")} for r in rows]

  assert logged("fol") == logged("syn") and len(logged("syn")) == 3
  assert {"loss", "seg", "proto", "aff"} <= set(logged("syn")[0])
