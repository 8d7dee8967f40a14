"""Every config under configs/ builds: the locked ConfigDict, the task, and an abstract trace of
the whole loss on ViT-B/16 at the config's crop size (vit_jax's pattern: a config nobody builds
breaks silently). Plus the one-line answer to a misspelled override."""

import importlib
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from ssr_jax import experiment
from ssr_jax.clip.model import CLIP, CONFIGS, init_params
from ssr_jax.data import sources
from ssr_jax.dino.model import CONFIGS as DINO_CONFIGS
from ssr_jax.dino.model import DINO
from ssr_jax.dino.model import init_params as dino_init

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


def test_every_config_is_listed():
  assert NAMES == ["base", "coco", "demo", "folder", "voc"]


def _with_a_folder(config, root):
  """configs/folder.py's config on a small folder dataset (3 classes, at most 2 per image): its
  class count, prompts and max_classes come from there."""
  (root / "images").mkdir(parents=True)
  for n in ("a", "b", "c"):
    Image.new("RGB", (8, 8)).save(root / "images" / f"{n}.png")
  (root / "labels.csv").write_text(
    "image,labels,split\na.png,cat;dog,train\nb.png,cow,train\nc.png,cat,val\n"
  )
  (root / "classes.txt").write_text("cat\ndog\ncow: cow,cattle\n")
  config.data.root = str(root)
  config.data.val_split = "val"
  out = sources.configure(config)
  assert (out.data.num_classes, out.model.max_classes) == (4, 2)
  assert out.model.class_names == ("cat", "dog", "cow,cattle")
  return out


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_and_traces(name, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.is_locked
  if name == "folder":
    config = _with_a_folder(config, tmp_path / "folder")
  c = config.data.crop_size
  # The demo ships its own tiny CLIP and DINO; the others run ViT-B/16 and DINO ViT-S/16 (traced
  # abstractly: no FLOPs).
  clip = CLIP(CONFIGS["ViT-B/16"])
  clip_params = jax.eval_shape(lambda: init_params(clip, jax.random.PRNGKey(0), image_size=c))
  d, k = clip.cfg.embed_dim, config.data.num_classes - 1
  frozen = dict(
    clip=clip_params,
    text_fg=jax.ShapeDtypeStruct((k, d), jnp.float32),
    text_bg=jax.ShapeDtypeStruct((len(config.model.bg_names), d), jnp.float32),
  )
  dino = None
  if config.model.cam.dino_weight > 0:  # The paper's DINO ViT-S/16, patch 16 like ViT-B/16.
    dino = DINO(DINO_CONFIGS["ViT-S/16"])
    frozen["dino"] = jax.eval_shape(lambda: dino_init(dino, jax.random.PRNGKey(0)))
  task = experiment.make_task(config, clip=clip, dino=dino)
  b = 2
  batch = dict(
    image=jax.ShapeDtypeStruct((b, c, c, 3), jnp.uint8),
    labels=jax.ShapeDtypeStruct((b, k), jnp.float32),
    superpixels=jax.ShapeDtypeStruct((b, c, c), jnp.int32),
    clusters=jax.ShapeDtypeStruct((b, c, c), jnp.int32),
  )
  params = jax.eval_shape(task.init, jax.random.PRNGKey(0), batch)
  step = jax.ShapeDtypeStruct((), jnp.int32)
  total, (terms, _) = jax.eval_shape(
    lambda p, f, x, s: task.loss(p, f, x, step=s, rng=jax.random.PRNGKey(1)),
    params,
    frozen,
    batch,
    step,
  )
  assert total.shape == () and "seg" in terms


def test_derived_rfm_switch_follows_num_steps():
  config = importlib.import_module("configs.demo").get_config()
  config.train.num_steps = 400
  assert config.model.cam.rfm_switch_step == 400
  config.model.cam.rfm_switch_step = 7
  assert (config.train.num_steps, config.model.cam.rfm_switch_step) == (400, 7)


def _launch(*args):
  return subprocess.run(
    [sys.executable, "launch.py", "--workdir", "unused", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_misspelled_override_is_one_line():
  r = _launch("--config", "configs/demo.py", "--config.train.num_step=3")
  assert r.returncode == 2
  assert r.stderr.splitlines() == [
    "error: --config.train.num_step: configs/demo.py has no field 'train.num_step'; "
    "nearest: train.num_steps, train.warmup_steps, train.eps"
  ]
  r = _launch("--config=configs/voc.py", "--config.trian.batch_size=3")
  assert r.returncode == 2
  assert r.stderr.splitlines() == [
    "error: --config.trian.batch_size: configs/voc.py has no field 'trian.batch_size'; "
    "nearest: train.batch_size, eval.batch_size, demo.dino_batch_size"
  ]
