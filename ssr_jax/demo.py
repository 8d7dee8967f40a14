"""The embedded demo's inputs: synthetic data, its superpixels, a tiny CLIP and a tiny DINO.

`prepare(config, workdir)` returns a new config whose `data.root`, `clip.weights` and
`dino.weights` point at ready inputs; experiment.py then runs exactly what it runs for VOC or
COCO. Nothing is downloaded: the dataset is generated under the workdir, and the tiny CLIP and
tiny DINO ship with the package (`ssr_jax/assets/tiny_{clip,dino}.npz`, each checked against its
sha256 sidecar and the settings stored in it) because pretraining them costs minutes on a 2-core
CPU. `--config.demo.pretrain_clip=True` (`pretrain_dino=True`) pretrains one in the workdir
instead (needed when a demo.clip_* (demo.dino_*) field changes); `python -m ssr_jax.demo
--config configs/demo.py --workdir W --write_shipped_clip --write_shipped_dino` rewrites the
shipped files with that code.

The tiny CLIP (3 blocks, width 96, patch 8, 96 px) sees its own synthetic stream
(`synthetic.generate(..., stream=2, decorrelated=True)`: any object on any background, riders
still only on horses), standing in for the broad web data of a real CLIP, while the WSSS splits
keep their correlations. It is trained with CLIP's InfoNCE on image-caption pairs only, never
masks (ssr_jax/clip/pretrain.py).

The tiny DINO (DINO's ViT architecture, same patch, so the same 12x12 grid as the tiny CLIP) is
pretrained as a denoising autoencoder on an unbounded stream of the generator's images
(`dino_stream`: no masks, labels or captions; ssr_jax/dino/pretrain.py, whose `Recipe` also
records the DINO and iBOT recipes that left its attention at chance), checkpointed with Orbax
under <workdir>/dino_pretrain so that the same command, rerun, resumes. Its pretraining reports,
with the val masks, the attention purity (share of a patch's attention inside its own segment)
of uniform attention, a random-init ViT, the tiny DINO and the tiny
CLIP: how good each is as SGC's propagation affinity (method §3.1); and the tiny CLIP's
zero-shot image-level mAP on val.
"""

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from ssr_jax import machine
from ssr_jax.clip import convert, pretrain
from ssr_jax.clip.model import CLIP, CLIPConfig
from ssr_jax.clip.preprocess import normalize as clip_normalize
from ssr_jax.clip.tokenizer import tokenize
from ssr_jax.data import superpixels, synthetic
from ssr_jax.dino import convert as dino_convert
from ssr_jax.dino import pretrain as dino_pretrain
from ssr_jax.dino.model import DINO, DINOConfig, init_params

log = logging.getLogger(__name__)

SHIPPED_CLIP = Path(__file__).parent / "assets" / "tiny_clip.npz"
SHIPPED_DINO = Path(__file__).parent / "assets" / "tiny_dino.npz"


class DemoError(Exception):
  """The demo's inputs cannot be prepared as configured (names the field or file to fix)."""


def prepare(config, workdir):
  """A copy of config with data.root (synthetic data + superpixels), data.tfds_data_dir (their
  TFDS build, read when data.source is "tfds"), clip.weights and dino.weights filled in (those
  already set are kept).

  Process 0 writes the shared files; the other processes wait for them.
  """
  config = config.copy_and_resolve_references()
  folder = world_folder(synthetic.world_from_config(config.data.synthetic))  # Checks the dials.
  config.data.root = config.data.root or str(epath.Path(workdir) / folder)
  if config.data.source == "tfds" and importlib.util.find_spec("tensorflow_datasets") is None:
    # Hosts without tensorflow-datasets (the GPU image) still run the demo, from the folders.
    log.warning(
      "tensorflow-datasets is not installed: the demo reads its folders (data.source=files)"
    )
    config.data.source = "files"
  if config.data.source == "tfds":
    tfds_dir = folder.replace("data", "tfds", 1)
    config.data.tfds_data_dir = config.data.tfds_data_dir or str(epath.Path(workdir) / tfds_dir)
  if jax.process_index() == 0:
    _write_data(config)
  multihost_utils.sync_global_devices("ssr_jax.demo data")
  if not config.clip.weights:
    config.clip.weights = _weights(_CLIP, config, workdir)
  if not config.dino.weights:
    config.dino.weights = _weights(_DINO, config, workdir)
  return config


def world_folder(world: synthetic.World) -> str:
  """The workdir folder of a world's data: "data" for the default one, else named by its changed
  dials ("data_rider_on_horse0.3"), so that superpixels and TFDS builds of another world are
  never reused."""
  return "_".join(["data", *(f"{k}{v:g}" for k, v in world.changed().items())])


def _weights(kind, config, workdir) -> str:
  """The path of kind's weights: the shipped file (checked), or with config.demo.<kind.flag>
  one pretrained in the workdir (again only if its stored settings differ from the config's)."""
  if not getattr(config.demo, kind.flag):
    check_shipped(kind, config, kind.shipped)
    return str(kind.shipped)
  path = str(epath.Path(workdir) / kind.subdir / kind.shipped.name)
  if jax.process_index() == 0 and _settings_of(kind, path) != _as_stored(kind.settings(config)):
    kind.pretrain(config, path, workdir)  # None yet, or one made with other settings.
  multihost_utils.sync_global_devices(f"ssr_jax.demo {kind.subdir}")
  return path


def _write_data(config):
  t0 = time.time()
  sc = config.data.synthetic
  synthetic.write_dataset(
    config.data.root,
    num_train=sc.num_train,
    num_val=sc.num_val,
    size=sc.image_size,
    seed=sc.seed,
    world=synthetic.world_from_config(sc),
  )
  splits = (config.data.train_split, config.data.val_split)
  for split in splits:
    superpixels.precompute(config.data, split, workers=os.cpu_count() or 1, progress=False)
  if config.data.source == "tfds":  # Resumable: a rerun only checks the complete shards.
    from ssr_jax.data import tfds_build  # Late: tensorflow_datasets only for this source.

    tfds_build.build(config.data, splits, superpixels=True, progress=False)
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


def pretrain_tiny_clip(config, path, workdir) -> dict:
  """Pretrains the demo's tiny CLIP (ssr_jax.clip.pretrain) and writes it to path (.npz).

  Checkpoints under workdir/clip_pretrain (a rerun resumes there). Needs the synthetic val split
  under config.data.root (for the zero-shot check it reports).
  """
  d, sc, m = config.demo, config.data.synthetic, config.model
  corpus = synthetic.generate(
    d.clip_images, size=sc.image_size, seed=sc.seed + 1000, stream=2, decorrelated=True
  )
  val = synthetic.read_split(config.data.root, config.data.val_split)
  model = CLIP(tiny_clip_config(config))
  settings = pretraining_settings(config)
  params, run = pretrain.pretrain_clip(
    model,
    corpus["image"],
    corpus["caption"],
    steps=d.clip_steps,
    batch_size=d.clip_batch_size,
    lr=d.clip_lr,
    seed=d.clip_seed,
    normalization=m.normalization,
    workdir=epath.Path(workdir) / "clip_pretrain",
    settings=settings,
    save_every=d.clip_save_every,
  )
  seconds, loss = run["seconds"], run["final_loss"]
  acc = pretrain.zero_shot_accuracy(
    model, params, val["image"], val["labels"], m.class_names, m.prompt_template, m.normalization
  )
  prompts = [m.prompt_template.format(n) for n in (*m.class_names, *m.bg_names)]
  params = _prune_token_rows(params, [*corpus["caption"], *prompts], model.cfg.context_length)
  info = dict(
    settings=settings,
    command=shlex.join(["python", *sys.argv]),
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
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  convert.save_converted(path, model.cfg, params, meta=dict(demo_pretraining=info), compress=True)
  return info


# ------------------------------------------------------------------ tiny DINO


def tiny_dino_config(config) -> DINOConfig:
  d = config.demo
  return DINOConfig(
    image_size=config.data.crop_size,  # The position grid the SSR model's inputs have.
    patch_size=d.dino_patch,
    width=d.dino_width,
    layers=d.dino_layers,
    heads=d.dino_heads,
    mlp=4 * d.dino_width,
  )


# The generator's stream the tiny DINO learns from (0 and 1 are the train and val splits, 2 the
# tiny CLIP's corpus): unbounded, image i a pure function of (data seed, stream, i).
DINO_STREAM = 3


def dino_stream(config):
  """step -> uint8 [demo.dino_batch_size, S, S, 3]: the tiny DINO's batch of that step, images
  step * B ... of the generator's stream DINO_STREAM, decorrelated (any object on any
  background, as the tiny CLIP's corpus, standing in for ImageNet's variety). Masks, labels and
  captions are rendered but never used."""
  b, sc = config.demo.dino_batch_size, config.data.synthetic
  return lambda step: synthetic.generate(
    b, size=sc.image_size, seed=sc.seed, stream=DINO_STREAM, start=step * b, decorrelated=True
  )["image"]


def dino_pretraining_settings(config) -> dict:
  """Everything the tiny DINO's weights depend on; stored in its file and compared on use."""
  d, sc = config.demo, config.data.synthetic
  return dict(
    dino=dataclasses.asdict(tiny_dino_config(config)),
    steps=d.dino_steps,
    batch_size=d.dino_batch_size,
    lr=d.dino_lr,
    seed=d.dino_seed,
    recipe=dataclasses.asdict(dino_pretrain.RECIPE),
    images=f"generator stream {DINO_STREAM}, decorrelated, {d.dino_steps * d.dino_batch_size}",
    image_size=sc.image_size,
    data_seed=sc.seed,
  )


def pretrain_tiny_dino(config, path, workdir, *, clip_path=None) -> dict:
  """Pretrains the demo's tiny DINO (ssr_jax.dino.pretrain) and writes it to path (.npz).

  Trains on `dino_stream`, checkpointing under workdir/dino_pretrain (a rerun resumes there),
  logging the attention purity on val every demo.dino_eval_every steps; then reports the
  attention purity on the val split (under config.data.root) for uniform attention, a
  random-init ViT, the tiny DINO and the CLIP at clip_path (config.clip.weights or the shipped
  tiny CLIP when None; skipped if absent), and that CLIP's zero-shot mAP on val.
  """
  d = config.demo
  cfg = tiny_dino_config(config)
  clip_path = clip_path or config.clip.weights or SHIPPED_CLIP
  val = synthetic.read_split(config.data.root, config.data.val_split)
  segments = dino_pretrain.patch_segments(val["mask"], cfg.patch_size)
  fused = config.model.cam.dino_layers

  def evaluate(step, params):
    attn = dino_pretrain.dino_attention(DINO(cfg), params, val["image"])[-fused:].mean(axis=0)
    log.info(
      "tiny DINO step %d: attention purity on val of its last %d layers, balanced %.3f, plain %.3f",
      step,
      fused,
      dino_pretrain.attention_purity(attn, segments, balanced=True),
      dino_pretrain.attention_purity(attn, segments),
    )

  settings = dino_pretraining_settings(config)
  params, run = dino_pretrain.pretrain_dino(
    cfg,
    dino_stream(config),
    steps=d.dino_steps,
    lr=d.dino_lr,
    seed=d.dino_seed,
    workdir=epath.Path(workdir) / "dino_pretrain",
    settings=settings,
    save_every=d.dino_save_every,
    evaluate=evaluate,
    eval_every=d.dino_eval_every,
  )
  purity = attention_purities(config, cfg, params, clip_path)
  info = dict(
    settings=settings,
    command=shlex.join(["python", *sys.argv]),
    final_loss=run["final_loss"],
    seconds=run["seconds"],
    machine=machine.cpu_line(),
    attention_purity=purity,
    clip_zero_shot_map=clip_zero_shot_map(config, clip_path),
  )
  print(
    f"tiny DINO: {d.dino_steps} steps of {d.dino_batch_size} images x "
    f"(2 global + {dino_pretrain.RECIPE.num_local} local crops) from the generator's stream in "
    f"{run['seconds']:.0f}s ({machine.cpu_line()}), loss {run['final_loss']:.3f}. Attention "
    "purity on val (share of a patch's attention, heads averaged, inside its own segment; "
    f"balanced: segments weighted equally), per layer, of the layers' mean, and of the layers SGC "
    f"fuses (DINO's last {fused}, CLIP's last {config.model.cam.num_attn_layers}):"
  )
  for kind, table in purity.items():
    for name, p in table.items():
      layers = " ".join(f"{v:.3f}" for v in p["layers"])
      print(f"  {kind:>8} {name:>7}: {layers}  mean {p['mean']:.3f}  fused {p['fused']:.3f}")
  print(f"CLIP {clip_path}: zero-shot image-level mAP on val {info['clip_zero_shot_map']}")
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  dino_convert.save_converted(path, cfg, params, meta=dict(demo_pretraining=info), compress=True)
  return info


def _load_clip(clip_path):
  """(CLIP, params) at clip_path, or None when there is no such file."""
  if not epath.Path(clip_path).is_file():
    return None
  return convert.load_clip(clip_path)


def clip_zero_shot_map(config, clip_path):
  """The CLIP's image-level mAP on val from its prompts (model.prompt_template of each class
  name; `pretrain.mean_average_precision`), or None when clip_path does not exist."""
  loaded = _load_clip(clip_path)
  if loaded is None:
    return None
  m = config.model
  val = synthetic.read_split(config.data.root, config.data.val_split)
  scores = pretrain.zero_shot_scores(
    *loaded, val["image"], m.class_names, m.prompt_template, m.normalization
  )
  return pretrain.mean_average_precision(scores, val["labels"])


def attention_purities(config, cfg: DINOConfig, params, clip_path) -> dict:
  """Attention purity on the val split (dino_pretrain.attention_purity, heads averaged).

  Returns {"plain" | "balanced": {model: {"layers": [purity of each layer's attention],
  "mean": purity of the layers' mean attention, "fused": purity of the mean of the layers SGC
  fuses (DINO's last model.cam.dino_layers, CLIP's last model.cam.num_attn_layers)}}} for
  uniform attention (the chance level), random (a random-init ViT of cfg), dino (params) and
  clip (the CLIP at clip_path, if that file exists and has cfg's patch size).
  """
  val = synthetic.read_split(config.data.root, config.data.val_split)
  segments = dino_pretrain.patch_segments(val["mask"], cfg.patch_size)
  model = DINO(cfg)
  random = init_params(model, jax.random.PRNGKey(config.demo.dino_seed))
  t = segments.shape[1] + 1
  cc = config.model.cam
  attn = {  # ([L, B, T, T], layers SGC fuses) each.
    "uniform": (np.ones((1, len(segments), t, t), np.float32), 1),
    "random": (dino_pretrain.dino_attention(model, random, val["image"]), cc.dino_layers),
    "dino": (dino_pretrain.dino_attention(model, params, val["image"]), cc.dino_layers),
  }
  loaded = _load_clip(clip_path)
  if loaded is not None and loaded[0].cfg.patch_size == cfg.patch_size:  # Same grid.
    clip, clip_params = loaded
    norm = config.model.normalization
    features = lambda x: clip.apply(
      {"params": clip_params}, clip_normalize(x, norm), method=clip.image_features
    )
    clip_attn = np.asarray(jax.jit(features)(val["image"])["attn"])  # Heads averaged.
    attn["clip"] = (clip_attn, min(cc.num_attn_layers, len(clip_attn)))
  purity = functools.partial(dino_pretrain.attention_purity, segments=segments)
  return {
    kind: {
      name: dict(
        layers=[purity(x, balanced=balanced) for x in a],
        mean=purity(a.mean(axis=0), balanced=balanced),
        fused=purity(a[-n:].mean(axis=0), balanced=balanced),
      )
      for name, (a, n) in attn.items()
    }
    for kind, balanced in (("plain", False), ("balanced", True))
  }


# ------------------------------------------------------------------ shipped weights


@dataclasses.dataclass(frozen=True)
class _Kind:
  """One of the demo's pretrained models: where it ships, how it is made and checked."""

  name: str  # For messages: "tiny CLIP".
  flag: str  # The config.demo field that pretrains one in the workdir instead.
  shipped: Path
  subdir: str  # Workdir subfolder of a pretrained one.
  fields: str  # The config fields its settings come from, for messages.
  cost: str  # Pretraining time, for messages.
  settings: Callable  # config -> dict of everything the weights depend on.
  read_metadata: Callable  # path -> the file's metadata (its "extra" holds the settings).
  pretrain: Callable  # (config, path, workdir) -> info; writes the file.


_CLIP = _Kind(
  name="tiny CLIP",
  flag="pretrain_clip",
  shipped=SHIPPED_CLIP,
  subdir="clip",
  fields="config.demo.clip_*, data.synthetic, model.normalization",
  cost="4-12 min on 2 cores; resumable",
  settings=pretraining_settings,
  read_metadata=convert.read_metadata,
  pretrain=pretrain_tiny_clip,
)
_DINO = _Kind(
  name="tiny DINO",
  flag="pretrain_dino",
  shipped=SHIPPED_DINO,
  subdir="dino",
  fields="config.demo.dino_*, data.synthetic, data.crop_size",
  cost="3-6 min on 2 cores; resumable",
  settings=dino_pretraining_settings,
  read_metadata=dino_convert.read_metadata,
  pretrain=pretrain_tiny_dino,
)


def _as_stored(settings: dict) -> dict:
  """settings as they read back from a file's JSON metadata (tuples become lists)."""
  return json.loads(json.dumps(settings))


def _settings_of(kind, path):
  """The pretraining settings stored in kind's file at path (None if there is no such file)."""
  if not epath.Path(path).exists():
    return None
  return kind.read_metadata(path)["extra"]["demo_pretraining"]["settings"]


def check_shipped(kind, config, path) -> None:
  """Raises DemoError unless path matches its sha256 sidecar and the config's pretraining."""
  sidecar = epath.Path(str(path) + ".sha256")
  flag = f"--config.demo.{kind.flag}=True"
  if not epath.Path(path).is_file() or not sidecar.is_file():
    raise DemoError(
      f"the shipped {kind.name} {path} (or its .sha256) is missing: reinstall ssr_jax, or pass "
      f"{flag} to pretrain one in the workdir"
    )
  expected = sidecar.read_text().split()[0]
  if convert.sha256_file(path) != expected:
    raise DemoError(
      f"{path} does not match its sha256 ({sidecar}): the file is damaged (a Git LFS pointer?). "
      f"Reinstall ssr_jax, or pass {flag} to pretrain one"
    )
  shipped = _settings_of(kind, path)
  wanted = _as_stored(kind.settings(config))
  diff = sorted(k for k in wanted if shipped.get(k) != wanted[k])
  if diff:
    raise DemoError(
      f"the shipped {kind.name} was pretrained with other {', '.join(diff)} than this config "
      f"asks for ({kind.fields}): pass {flag} to pretrain a matching one ({kind.cost})"
    )


def check_shipped_clip(config, path) -> None:
  """check_shipped for the tiny CLIP."""
  check_shipped(_CLIP, config, path)


def check_shipped_dino(config, path) -> None:
  """check_shipped for the tiny DINO."""
  check_shipped(_DINO, config, path)


# ------------------------------------------------------------------ command line


def _main(argv):
  del argv
  kinds = [k for k, flag in ((_CLIP, _WRITE_CLIP), (_DINO, _WRITE_DINO)) if flag.value]
  if not kinds:
    raise app.UsageError("nothing to do: pass --write_shipped_clip and/or --write_shipped_dino")
  config = _CONFIG.value.copy_and_resolve_references()
  config.data.root = config.data.root or str(epath.Path(_WORKDIR.value) / "data")
  config.data.source = "files"  # Pretraining reads the folders; no TFDS build needed.
  _write_data(config)
  for kind in kinds:  # The CLIP first: the DINO's report compares with the shipped one.
    kind.pretrain(config, kind.shipped, _WORKDIR.value)
    digest = convert.sha256_file(kind.shipped)
    Path(str(kind.shipped) + ".sha256").write_text(f"{digest}  {kind.shipped.name}\n")
    print(f"wrote {kind.shipped} (sha256 {digest})")


if __name__ == "__main__":
  # Flags are defined here, not at import: launch.py defines flags of the same names.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/demo.py (or a variant).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the synthetic data is generated.")
  _WRITE_CLIP = flags.DEFINE_bool(
    "write_shipped_clip", False, f"Pretrain the tiny CLIP and overwrite {SHIPPED_CLIP}."
  )
  _WRITE_DINO = flags.DEFINE_bool(
    "write_shipped_dino", False, f"Pretrain the tiny DINO and overwrite {SHIPPED_DINO}."
  )
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)
