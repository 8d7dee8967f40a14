"""Part of PASCAL VOC as a user has it, through every documented command, each run in a
subprocess as the README writes it: a dozen photos under real VOC ids with VOC-shaped masks, own
split lists, random Hugging Face-format CLIP and DINO folders, configs/voc.py and overrides only.

Check, superpixels, the TFDS build, training (the paper's SSR: CMPA, DINO attention, SGC's colour
regions; a few small steps), evaluation of every target on both lists, and predict; every output
lands under the workdir, and the data, lists and weights folders are left as they were.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ssr_jax.clip.model import CLIPConfig
from ssr_jax.data import files, voc
from ssr_jax.data.dataset import read_list
from ssr_jax.dino.model import DINOConfig
from tests.data.conftest import random_image
from tests.hf_files import random_hf_clip, random_hf_dino

pytest.importorskip("tensorflow_datasets")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# VOC's 500x375 and 375x500 at a third (VOC photos are mostly these two shapes).
SIZES = ((125, 167), (167, 125))
# Patch 16 as ViT-B/16, 8 layers for WeCLIP's last-8 attention maps (model.cam.num_attn_layers),
# the real tokenizer's vocabulary; tiny widths.
CLIP = CLIPConfig(
  embed_dim=16,
  image_size=64,
  patch_size=16,
  vision_width=16,
  vision_layers=8,
  vision_heads=2,
  context_length=77,
  vocab_size=49408,
  text_width=16,
  text_layers=1,
  text_heads=2,
)
DINO = DINOConfig(image_size=64, patch_size=16, width=16, layers=4, heads=2, mlp=32)


def _mask(rng, h, w):
  """A VOC-like mask: background, one or two class rectangles, a 255 border around each."""
  m = np.zeros((h, w), np.uint8)
  for c in rng.choice(np.arange(1, 21), size=int(rng.integers(1, 3)), replace=False):
    y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    m[y : y + h // 2 + 2, x : x + w // 2 + 2] = 255
    m[y + 1 : y + h // 2 + 1, x + 1 : x + w // 2 + 1] = c
  return m


@pytest.fixture(scope="module")
def user(tmp_path_factory):
  """{root, lists, train, val, clip, dino, ids}: the user's folders (outside any workdir)."""
  top = tmp_path_factory.mktemp("user")
  rng = np.random.default_rng(0)
  train_ids = read_list(voc.split_file("train"))[:8]
  val_ids = read_list(voc.split_file("val"))[:4]
  root = top / "VOCdevkit" / "VOC2012"
  (root / "JPEGImages").mkdir(parents=True)
  for k, i in enumerate(train_ids + val_ids):
    h, w = SIZES[k % 2]
    Image.fromarray(random_image(rng, h, w)).save(root / "JPEGImages" / f"{i}.jpg", quality=90)
    files.write_png(str(root / "SegmentationClassAug" / f"{i}.png"), _mask(rng, h, w))
  lists = top / "lists"
  lists.mkdir()
  (lists / "mytrain.txt").write_text("".join(f"{i}\n" for i in train_ids))
  (lists / "myval.txt").write_text("".join(f"{i}\n" for i in val_ids))
  return dict(
    root=str(root),
    lists=lists,
    train=str(lists / "mytrain.txt"),
    val=str(lists / "myval.txt"),
    clip=str(random_hf_clip(top / "clip-vit-tiny-patch16", CLIP)),
    dino=str(random_hf_dino(top / "dino-vit-tiny16", DINO)),
    val_ids=val_ids,
    top=top,
  )


def _env(tmp):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  env["XDG_CACHE_HOME"] = str(tmp / "xdg")  # The user cache dir (converted CLIP weights).
  # `python` in the README's commands is this interpreter.
  bin_dir = tmp / "bin"
  bin_dir.mkdir(exist_ok=True)
  shim = bin_dir / "python"  # A script, not a symlink: a venv's python finds its venv by path.
  shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
  shim.chmod(0o755)
  env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
  return env


def _readme() -> str:
  with open(os.path.join(REPO, "README.md")) as f:
    return f.read()


def _readme_block(heading: str) -> str:
  """The first ```bash block after a README heading."""
  text = _readme()
  start = text.index("```bash\n", text.index(heading)) + len("```bash\n")
  return text[start : text.index("```", start)]


def _run(script: str, env, *, ok=True) -> subprocess.CompletedProcess:
  """Commands as the README writes them, run by bash from the repository root."""
  out = subprocess.run(
    ["bash", "-e", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
  )
  if ok:
    assert out.returncode == 0, f"{script}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
  return out


def _tree(path) -> dict:
  """{relative path: size} of every file under path."""
  out = {}
  for d, _, names in os.walk(path):
    for n in names:
      p = os.path.join(d, n)
      out[os.path.relpath(p, path)] = os.path.getsize(p)
  return out


def test_shipped_lists_on_a_subset_are_summarised_with_the_way_out(user, tmp_path):
  """The README's check, superpixel and TFDS build commands (steps 3, 5, 6) with the shipped
  lists on a folder that has 12 of VOC's images: one summary per split, nothing written."""
  env = _env(tmp_path)
  before = _tree(user["top"])
  commands = (
    "python -m ssr_jax.data.check --config configs/voc.py "
    "--config.data.root=/path/VOCdevkit/VOC2012",
    "python -m ssr_jax.data.superpixels --config configs/voc.py --config.data.root=... "
    "--split train_aug",
    "python -m ssr_jax.data.tfds_build --config configs/voc.py --config.data.root=... "
    "--config.data.tfds_data_dir=/path/tfds",
  )
  readme = " ".join(_readme().split())
  outs = []
  for command in commands:
    assert f"`{command}`" in readme
    command = command.replace("/path/VOCdevkit/VOC2012", user["root"])
    command = command.replace("...", user["root"]).replace("/path/tfds", str(tmp_path / "tfds"))
    out = _run(command, env, ok=False)
    assert out.returncode == 1, out.stderr[-3000:]
    outs.append(out.stdout + out.stderr)
  check, sp, build = outs
  # One summary per split (not a line per missing file): the count, a few names, the cause.
  assert "10574 of 10582 images and 10574 masks named by split 'train_aug'" in check
  assert "1445 of 1449 images and 1445 masks named by split 'val'" in check
  assert check.count("Likely cause: the list names images your data.root does not have") == 2
  assert "--config.data.train_split=PATH" in check and len(check.splitlines()) < 60
  for text in (sp, build):  # Every missing image, before any work.
    assert "10574 of 10582 images" in text and "--config.data.train_split=PATH" in text
    assert "Traceback" not in text
  assert _tree(user["top"]) == before and os.listdir(tmp_path) == ["bin"]


def test_voc_subset_from_check_to_predict(user, tmp_path):
  """The README's subset block, paths replaced and a few flags added to launch.py (2 small
  steps, every target on both lists, from the TFDS build)."""
  env = _env(tmp_path)
  work = tmp_path / "runs" / "mine"
  photos = tmp_path / "photos"
  photos.mkdir()
  val_id = user["val_ids"][0]
  shutil.copy(f"{user['root']}/JPEGImages/{val_id}.jpg", photos)
  before = _tree(user["top"])
  train, val = user["train"], user["val"]
  # SSR as published (configs/voc.py), small and short: 2 steps of 2 crops of 128 px.
  test_flags = (
    f"--config.data.source=tfds --config.data.tfds_data_dir={work}/tfds "
    "--config.train.num_steps=2 --config.train.batch_size=2 --config.data.crop_size=128 "
    "--config.data.num_workers=2 --config.data.worker_type=thread --config.eval.long_side=128 "
    "--config.model.cmpa.refresh_every=1 --config.model.cmpa.bank_size=64 "
    '--config.eval.targets=\'("clip_cam","cam","pseudo","seg")\' '
    f'--config.eval.splits=\'("{train}","{val}")\''
  )
  script = _readme_block("### Subsets and your own split lists")
  for placeholder, path in (
    ("/path/VOCdevkit/VOC2012", user["root"]),
    ("/path/lists", str(user["lists"])),
    ("/path/clip-vit-base-patch16", user["clip"]),
    ("/path/dino-vits16", user["dino"]),
    ("/path/photos", str(photos)),
    ("runs/mine", str(work)),
  ):
    assert placeholder in script
    script = script.replace(placeholder, path)
  launch = "--config.dino.weights=" + user["dino"]
  assert script.count(launch) == 1
  script = script.replace(launch, f"{launch} {test_flags}")
  out = _run(script, env)
  text = out.stdout + out.stderr

  assert "mytrain.txt: 8 images, 8 with masks, 0 without a foreground label" in text
  assert "myval.txt: 4 images, 4 with masks, 0 without a foreground label" in text
  assert len(os.listdir(work / "superpixels" / "clusters_k8")) == 12
  build = work / "tfds" / "ssr_voc" / "superpixels.clusters_k8" / "1.0.0"
  info = json.loads((build / "dataset_info.json").read_text())
  # The builders' module, not __main__ (TFDS derives their package from it).
  assert info["moduleName"] == "ssr_jax.data.tfds_build"
  splits = json.loads((build / "metadata.json").read_text())["splits"]
  assert sorted(splits) == ["mytrain", "myval"]

  assert "mIoU on mytrain: clip_cam" in text and "mIoU on myval: clip_cam" in text
  metrics = json.loads((work / "eval" / "metrics.json").read_text())
  targets = {"clip_cam", "cam", "pseudo", "seg"}
  assert set(metrics) == {"mytrain", "myval"} and all(set(m) == targets for m in metrics.values())
  for label, n in (("mytrain", 8), ("myval", 4)):
    for t in targets:
      m = metrics[label][t]
      assert m["num_images"] == n and m["split"] == (train if label == "mytrain" else val)
      assert m == json.loads((work / "eval" / f"metrics_{label}_{t}.json").read_text())
      assert len(os.listdir(work / "eval" / f"{label}_{t}" / "pred")) == n
      assert os.listdir(work / "eval" / f"{label}_{t}" / "vis")

  got = np.asarray(Image.open(work / "preds" / f"{val_id}.png"))
  want = np.asarray(Image.open(work / "eval" / "myval_seg" / "pred" / f"{val_id}.png"))
  np.testing.assert_array_equal(got, want)  # Same checkpoint, same protocol.

  # Nothing written beside the data, the lists or the weights; the converted CLIP is in the
  # user cache dir.
  assert _tree(user["top"]) == before
  assert len(os.listdir(tmp_path / "xdg" / "ssr_jax")) == 1
  assert set(os.listdir(tmp_path)) == {"bin", "photos", "runs", "xdg"}
