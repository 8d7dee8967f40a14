"""The embedded demo's inputs: synthetic data, its superpixels, and a tiny CLIP.

`prepare(config, workdir)` returns a new config whose `data.root` and `clip.weights` point at
ready inputs; experiment.py then runs exactly what it runs for VOC or COCO. Nothing is
downloaded: the dataset is generated under the workdir, and the tiny CLIP ships with the package
(`ssr_jax/assets/tiny_clip.npz`, checked against its sha256 sidecar) because pretraining it
costs 4-12 minutes on a 2-core CPU. `--config.demo.pretrain_clip=True` pretrains one in the
workdir instead (needed when a demo.clip_* field changes); `python -m ssr_jax.demo --config
configs/demo.py --workdir W --write_shipped_clip` rewrites the shipped file with that command.

The tiny CLIP (3 blocks, width 96, patch 8, 96 px) sees its own synthetic stream
(`synthetic.generate(..., stream=2, decorrelated=True)`: any object on any background, riders
still only on horses), standing in for the broad web data of a real CLIP, while the WSSS splits
keep their correlations. It is trained with CLIP's InfoNCE on image-caption pairs only, never
masks (ssr_jax/clip/pretrain.py).
"""

import dataclasses
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from ssr_jax import machine
from ssr_jax.clip import convert, pretrain
from ssr_jax.clip.model import CLIP, CLIPConfig
from ssr_jax.clip.tokenizer import tokenize
from ssr_jax.data import superpixels, synthetic

log = logging.getLogger(__name__)

SHIPPED_CLIP = Path(__file__).parent / "assets" / "tiny_clip.npz"


class DemoError(Exception):
  """The demo's inputs cannot be prepared as configured (names the field or file to fix)."""


def prepare(config, workdir):
  """A copy of config with data.root (synthetic data + superpixels) and clip.weights filled in.

  Process 0 writes the shared files; the other processes wait for them.
  """
  config = config.copy_and_resolve_references()
  config.data.root = config.data.root or os.path.join(workdir, "data")
  if jax.process_index() == 0:
    _write_data(config)
  multihost_utils.sync_global_devices("ssr_jax.demo data")
  if not config.clip.weights:
    if config.demo.pretrain_clip:
      path = os.path.join(workdir, "clip", "tiny_clip.npz")
      if jax.process_index() == 0 and _settings_of(path) != pretraining_settings(config):
        pretrain_tiny_clip(config, path)  # None yet, or one made with other settings.
      multihost_utils.sync_global_devices("ssr_jax.demo clip")
    else:
      path = str(SHIPPED_CLIP)
      check_shipped_clip(config, path)
    config.clip.weights = path
  return config


def _write_data(config):
  t0 = time.time()
  sc = config.data.synthetic
  synthetic.write_dataset(
    config.data.root, num_train=sc.num_train, num_val=sc.num_val, size=sc.image_size, seed=sc.seed
  )
  for split in (config.data.train_split, config.data.val_split):
    superpixels.precompute(config.data, split, workers=os.cpu_count() or 1, progress=False)
  log.info("synthetic data ready under %s (%.1fs)", config.data.root, time.time() - t0)


# ------------------------------------------------------------------ tiny CLIP


def tiny_clip_config(config) -> CLIPConfig:
  d = config.demo
  return CLIPConfig(
    embed_dim=d.clip_width,
    image_size=config.data.crop_size,
    patch_size=d.clip_patch,
    vision_width=d.clip_width,
    vision_layers=d.clip_layers,
    vision_heads=4,
    context_length=24,
    text_width=d.clip_width,
    text_layers=2,
    text_heads=4,
  )


def pretraining_settings(config) -> dict:
  """Everything the tiny CLIP's weights depend on; stored in its file and compared on use."""
  d, sc = config.demo, config.data.synthetic
  # CLIPConfig fields left at None (the 4x MLP widths) are omitted, so files written before
  # those fields existed (the shipped tiny CLIP) still match.
  clip = {k: v for k, v in dataclasses.asdict(tiny_clip_config(config)).items() if v is not None}
  return dict(
    clip=clip,
    steps=d.clip_steps,
    images=d.clip_images,
    batch_size=d.clip_batch_size,
    lr=d.clip_lr,
    seed=d.clip_seed,
    mosaic_weight=pretrain.MOSAIC_WEIGHT,
    patch_pooling=pretrain.PATCH_POOLING,
    image_size=sc.image_size,
    data_seed=sc.seed,
    normalization=config.model.normalization,
  )


def _prune_token_rows(params, texts, context_length):
  """Zeroes token-embedding rows that no caption or prompt uses.

  They are never looked up, so every text embedding is unchanged; the file shrinks from ~20 MB
  (the 49,408-token vocabulary is 90 % of a width-96 CLIP) to ~1 MB compressed.
  """
  used = np.unique(tokenize(list(texts), context_length=context_length))
  table = np.asarray(params["text"]["token_embedding"]["embedding"])
  keep = np.zeros(table.shape[0], bool)
  keep[used] = True
  pruned = {"embedding": np.where(keep[:, None], table, 0.0)}
  return {**params, "text": {**params["text"], "token_embedding": pruned}}


def pretrain_tiny_clip(config, path) -> dict:
  """Pretrains the demo's tiny CLIP (ssr_jax.clip.pretrain) and writes it to path (.npz).

  Needs the synthetic val split under config.data.root (for the zero-shot check it reports).
  """
  d, sc, m = config.demo, config.data.synthetic, config.model
  corpus = synthetic.generate(
    d.clip_images, size=sc.image_size, seed=sc.seed + 1000, stream=2, decorrelated=True
  )
  val = synthetic.read_split(config.data.root, config.data.val_split)
  model = CLIP(tiny_clip_config(config))
  t0 = time.time()
  params, loss = pretrain.pretrain_clip(
    model,
    corpus["image"],
    corpus["caption"],
    steps=d.clip_steps,
    batch_size=d.clip_batch_size,
    lr=d.clip_lr,
    seed=d.clip_seed,
    normalization=m.normalization,
  )
  seconds = time.time() - t0
  acc = pretrain.zero_shot_accuracy(
    model, params, val["image"], val["labels"], m.class_names, m.prompt_template, m.normalization
  )
  prompts = [m.prompt_template.format(n) for n in (*m.class_names, *m.bg_names)]
  params = _prune_token_rows(params, [*corpus["caption"], *prompts], model.cfg.context_length)
  info = dict(
    settings=pretraining_settings(config),
    final_loss=loss,
    zero_shot_top1_present=acc,
    seconds=seconds,
    machine=machine.cpu_line(),
  )
  print(
    f"tiny CLIP: {d.clip_steps} steps (batch {d.clip_batch_size} + "
    f"{pretrain.num_mosaics(d.clip_batch_size)} 2x2 mosaics) on {d.clip_images} decorrelated "
    f"synthetic image-caption pairs in {seconds:.0f}s ({machine.cpu_line()}), loss {loss:.3f}, "
    f"zero-shot accuracy on val (top-1 class present) {acc:.3f}"
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  convert.save_converted(path, model.cfg, params, meta=dict(demo_pretraining=info), compress=True)
  return info


def _settings_of(path):
  """The pretraining settings stored in a tiny-CLIP file (None if there is no such file)."""
  if not os.path.exists(path):
    return None
  return convert.read_metadata(path)["extra"]["demo_pretraining"]["settings"]


def check_shipped_clip(config, path) -> None:
  """Raises DemoError unless path matches its sha256 sidecar and the config's pretraining."""
  sidecar = Path(str(path) + ".sha256")
  if not Path(path).is_file() or not sidecar.is_file():
    raise DemoError(
      f"the shipped tiny CLIP {path} (or its .sha256) is missing: reinstall ssr_jax, or pass "
      "--config.demo.pretrain_clip=True to pretrain one in the workdir"
    )
  expected = sidecar.read_text().split()[0]
  if convert.sha256_file(path) != expected:
    raise DemoError(
      f"{path} does not match its sha256 ({sidecar}): the file is damaged (a Git LFS pointer?). "
      "Reinstall ssr_jax, or pass --config.demo.pretrain_clip=True to pretrain one"
    )
  shipped = _settings_of(path)
  wanted = pretraining_settings(config)
  diff = sorted(k for k in wanted if shipped.get(k) != wanted[k])
  if diff:
    raise DemoError(
      f"the shipped tiny CLIP was pretrained with other {', '.join(diff)} than this config "
      "asks for (config.demo.clip_*, data.synthetic, model.normalization): pass "
      "--config.demo.pretrain_clip=True to pretrain a matching one (4-12 min on 2 cores)"
    )


# ------------------------------------------------------------------ command line


def _main(argv):
  del argv
  if not _WRITE.value:
    raise app.UsageError("nothing to do: pass --write_shipped_clip")
  config = _CONFIG.value.copy_and_resolve_references()
  config.data.root = config.data.root or os.path.join(_WORKDIR.value, "data")
  _write_data(config)
  pretrain_tiny_clip(config, SHIPPED_CLIP)
  digest = convert.sha256_file(SHIPPED_CLIP)
  Path(str(SHIPPED_CLIP) + ".sha256").write_text(f"{digest}  {SHIPPED_CLIP.name}\n")
  print(f"wrote {SHIPPED_CLIP} (sha256 {digest})")


if __name__ == "__main__":
  # Flags are defined here, not at import: launch.py defines flags of the same names.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/demo.py (or a variant).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the synthetic data is generated.")
  _WRITE = flags.DEFINE_bool(
    "write_shipped_clip", False, f"Pretrain the tiny CLIP and overwrite {SHIPPED_CLIP}."
  )
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)
