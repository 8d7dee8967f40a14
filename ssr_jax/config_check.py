"""Start-up validation of a whole config: every value that cannot work, listed at once.

`launch.py` (through experiment.run) runs `check_config(config, num_devices=...)` before anything
expensive (the demo's data generation, weights loading, data preparation); launch.py prints one
line per problem, each naming its key (`train.learning_rate=-0.001: must be > 0`), and exits 2.
The train loop checks `train_problems` again for callers that bypass launch.py. What needs the
weights (layer counts, patch sizes) is checked where they are loaded (model.ssr.build_task); what
needs the data, by data.check.verify_split.
"""

import dataclasses

from ssr_jax.clip.preprocess import DTYPES, NORMALIZATION
from ssr_jax.data import check, superpixels
from ssr_jax.data.pipeline import PIPELINES
from ssr_jax.data.sources import SOURCES
from ssr_jax.data.synthetic import World
from ssr_jax.eval.run import TARGETS
from ssr_jax.model.ssr import (
  CAM_POOLINGS,
  CAM_SOURCES,
  CMPA_SITES,
  CONTRASTS,
  POSITIVES,
  SGC_GROUPINGS,
)
from ssr_jax.train.state import SCHEDULES
from ssr_jax.train.step import NAN_POLICIES

DATASETS = ("voc", "coco", "synthetic", "folder")


class ConfigError(ValueError):
  """Config values that cannot work; `problems` holds one line per value, naming its key."""

  def __init__(self, problems):
    self.problems = list(problems)
    super().__init__("\n".join(self.problems))


# (requirement, predicate) pairs; a value failing the predicate gets "KEY=VALUE: requirement".
POSITIVE = ("must be > 0", lambda v: v > 0)
NON_NEGATIVE = ("must be >= 0", lambda v: v >= 0)
AT_LEAST_1 = ("must be >= 1", lambda v: v >= 1)
UNIT = ("must be in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_1 = ("must be in [0, 1)", lambda v: 0 <= v < 1)


def one_of(choices):
  return (f"use one of {tuple(choices)}", lambda v: v in choices)


def each(rule):
  """A rule for a non-empty tuple whose every element satisfies `rule`."""
  text, ok = rule
  return (f"must be a non-empty tuple, each entry {text.removeprefix('must be ')}", _each(ok))


def _each(ok):
  return lambda v: len(v) > 0 and all(ok(x) for x in v)


TRAIN_RULES = {
  "batch_size": POSITIVE,
  "num_steps": POSITIVE,
  "learning_rate": POSITIVE,
  "warmup_steps": NON_NEGATIVE,
  "warmup_ratio": UNIT,
  "schedule": one_of(SCHEDULES),
  "poly_power": POSITIVE,
  "weight_decay": NON_NEGATIVE,
  "b1": BELOW_1,
  "b2": BELOW_1,
  "eps": POSITIVE,
  "grad_clip": NON_NEGATIVE,
  "heads.learning_rate": POSITIVE,
  "heads.weight_decay": NON_NEGATIVE,
  "checkpoint_every": ("must be >= 0 (0 = off)", lambda v: v >= 0),
  "keep_checkpoints": AT_LEAST_1,
  "log_every": POSITIVE,
  "eval_every": ("must be >= 0 (0 = off)", lambda v: v >= 0),
  "nan_policy": one_of(NAN_POLICIES),
  "num_processes": ("must be >= 0 (0 = auto-detect)", lambda v: v >= 0),
  "process_id": NON_NEGATIVE,
}

RULES = {
  "clip.pos_interp": one_of(("bilinear", "bicubic")),
  "model.dtype": one_of(sorted(DTYPES)),
  "model.normalization": one_of(sorted(NORMALIZATION)),
  "model.max_classes": AT_LEAST_1,
  "model.logit_scale": POSITIVE,
  "model.decoder.embed_dim": POSITIVE,
  "model.decoder.num_layers": NON_NEGATIVE,
  "model.decoder.num_heads": POSITIVE,
  "model.decoder.dropout": BELOW_1,
  "model.cam.source": one_of(CAM_SOURCES),
  "model.cam.dino_weight": UNIT,
  "model.cam.dino_layers": AT_LEAST_1,
  "model.cam.num_attn_layers": AT_LEAST_1,
  "model.cam.rfm_layers": AT_LEAST_1,
  "model.cam.rfm_switch_step": NON_NEGATIVE,
  "model.cam.sinkhorn_iters": NON_NEGATIVE,
  "model.cam.box_threshold": UNIT,
  "model.cam.bg_power": POSITIVE,
  "model.cam.par_dilations": each(AT_LEAST_1),
  "model.cam.par_iters": NON_NEGATIVE,
  "model.cam.par_w_pos": NON_NEGATIVE,
  "model.cam.par_temp": POSITIVE,
  "model.cmpa.site": one_of(CMPA_SITES),
  "model.cmpa.contrast": one_of(CONTRASTS),
  "model.cmpa.hidden": ("must hold widths > 0", lambda v: all(x > 0 for x in v)),
  "model.cmpa.out_dim": POSITIVE,
  "model.cmpa.bn_momentum": UNIT,
  "model.cmpa.weight": NON_NEGATIVE,
  "model.cmpa.temperature": POSITIVE,
  "model.cmpa.refresh_every": POSITIVE,
  "model.cmpa.bank_size": POSITIVE,
  "model.cmpa.kmeans_iters": AT_LEAST_1,
  "model.cmpa.positive": one_of(POSITIVES),
  "model.cmpa.symmetric_weight": NON_NEGATIVE,
  "model.cmpa.cam_pooling": one_of(CAM_POOLINGS),
  "model.cmpa.cam_start_step": NON_NEGATIVE,
  "model.cmpa.cam_scale": ("must be >= 0 (0 = 1/tau)", lambda v: v >= 0),
  "model.cmpa.decoder.weight": NON_NEGATIVE,
  "model.cmpa.decoder.temperature": POSITIVE,
  "model.cmpa.decoder.proj": one_of(("linear", "mlp")),
  "model.cmpa.decoder.min_pixels": NON_NEGATIVE,
  "model.cmpa.decoder.bg_text": one_of(("mean", "best")),
  "model.cmpa.decoder.pixel_weight": NON_NEGATIVE,
  "model.cmpa.decoder.warmup_steps": NON_NEGATIVE,
  "model.sgc.grouping": one_of(SGC_GROUPINGS),
  "model.sgc.high_threshold": UNIT,
  "model.sgc.ratio_threshold": UNIT,
  "model.sgc.threshold": UNIT,
  "model.sgc.soft_alpha": UNIT,
  "model.sgc.max_superpixels": POSITIVE,
  "loss.seg_weight": NON_NEGATIVE,
  "loss.aff_weight": NON_NEGATIVE,
  "loss.aff_radius": AT_LEAST_1,
  "data.name": one_of(DATASETS),
  "data.num_classes": ("must be >= 2 (background included)", lambda v: v >= 2),
  "data.ignore_label": ("must be in [0, 255]", lambda v: 0 <= v <= 255),
  "data.source": one_of(SOURCES),
  "data.pipeline": one_of((*PIPELINES, "auto")),
  "data.verify": one_of(check.LEVELS),
  "data.crop_size": POSITIVE,
  "data.scale_range": (
    "must be (low, high) with 0 < low <= high",
    lambda v: len(v) == 2 and 0 < v[0] <= v[1],
  ),
  "data.color_jitter": UNIT,
  "data.num_workers": NON_NEGATIVE,
  "data.worker_type": one_of(("thread", "process")),
  "data.prefetch": NON_NEGATIVE,
  "data.superpixel_backend": one_of(superpixels.BACKENDS),
  "data.n_segments": POSITIVE,
  "data.superpixel_scale": AT_LEAST_1,
  "data.slic_iterations": AT_LEAST_1,
  "data.compactness": POSITIVE,
  "data.sigma": NON_NEGATIVE,
  "data.color_clusters": AT_LEAST_1,
  "data.cluster_position_weight": UNIT,
  **{f"train.{k}": rule for k, rule in TRAIN_RULES.items()},
  "eval.targets": (
    f"must be a non-empty subset of {TARGETS}",
    lambda v: len(v) > 0 and set(v) <= set(TARGETS),
  ),
  "eval.scales": each(POSITIVE),
  "eval.long_side": ("must be >= 0 (0 = native size)", lambda v: v >= 0),
  "eval.batch_size": POSITIVE,
  "eval.checkpoint_step": ("must be >= 0, or -1 for the latest", lambda v: v >= -1),
  "eval.max_images": ("must be >= 0 (0 = the whole split)", lambda v: v >= 0),
  "eval.num_vis": NON_NEGATIVE,
  "eval.crf_iters": AT_LEAST_1,
  "eval.crf_pos_xy_std": POSITIVE,
  "eval.crf_pos_w": NON_NEGATIVE,
  "eval.crf_bi_xy_std": POSITIVE,
  "eval.crf_bi_rgb_std": POSITIVE,
  "eval.crf_bi_w": NON_NEGATIVE,
  "ablation.num_seeds": AT_LEAST_1,
}

# The demo's tiny-model pretraining (read only when data.name == "synthetic").
DEMO_RULES = {
  **{f"data.synthetic.{f.name}": UNIT for f in dataclasses.fields(World)},
  "data.synthetic.num_train": POSITIVE,
  "data.synthetic.num_val": POSITIVE,
  "data.synthetic.image_size": POSITIVE,
  **{
    f"demo.{k}": NON_NEGATIVE if k.endswith("_steps") else POSITIVE
    for k in (
      "clip_steps",
      "clip_images",
      "clip_batch_size",
      "clip_lr",
      "clip_width",
      "clip_layers",
      "clip_patch",
      "clip_save_every",
      "dino_steps",
      "dino_batch_size",
      "dino_lr",
      "dino_width",
      "dino_layers",
      "dino_heads",
      "dino_patch",
      "dino_save_every",
    )
  },
}


def _get(config, key):
  for part in key.split("."):
    config = config[part]
  return config


def _apply(config, rules, prefix="") -> list[str]:
  out = []
  for key, (text, ok) in rules.items():
    value = _get(config, key)
    try:
      good = bool(ok(value))
    except TypeError:  # e.g. a string where a number belongs.
      good = False
    if not good:
      out.append(f"{prefix}{key}={value!r}: {text}")
  return out


def train_problems(train_cfg, *, num_devices: int | None) -> list[str]:
  """Problems of config.train; num_devices (None: not checked) must divide train.batch_size."""
  out = _apply(train_cfg, TRAIN_RULES, "train.")
  n, b = num_devices, train_cfg.batch_size
  if n and isinstance(b, int) and b > 0 and b % n:
    out.append(
      f"train.batch_size={b}: must be a multiple of the number of devices ({n}), e.g. "
      f"{max(n, b - b % n)}"
    )
  if 0 < train_cfg.num_processes <= train_cfg.process_id:
    out.append(
      f"train.process_id={train_cfg.process_id}: must be < train.num_processes "
      f"({train_cfg.num_processes})"
    )
  return out


def problems(config, *, num_devices: int | None) -> list[str]:
  """One line per config value that cannot work. num_devices: the devices training shards the
  batch over (jax.device_count()), or None where nothing trains (then not checked)."""
  train_rules = {f"train.{k}" for k in TRAIN_RULES}
  out = _apply(config, {k: v for k, v in RULES.items() if k not in train_rules})
  out += train_problems(config.train, num_devices=num_devices)
  if config.data.name == "synthetic":
    out += _apply(config, DEMO_RULES)
  if config.data.name == "folder":
    out += _apply(config, {"data.folder.val_fraction": BELOW_1})
  d, m = config.data, config.model
  if isinstance(d.ignore_label, int) and isinstance(d.num_classes, int):
    if 0 <= d.ignore_label < d.num_classes:
      out.append(
        f"data.ignore_label={d.ignore_label}: must not be a class index (< data.num_classes="
        f"{d.num_classes})"
      )
  if len(m.class_names) != d.num_classes - 1:
    out.append(
      f"model.class_names: {len(m.class_names)} names but data.num_classes={d.num_classes} "
      "(background included): set them consistently"
    )
  dec = m.decoder
  if dec.num_heads > 0 and dec.embed_dim % dec.num_heads:
    out.append(
      f"model.decoder.embed_dim={dec.embed_dim}: must be a multiple of model.decoder.num_heads "
      f"({dec.num_heads})"
    )
  return out


def check_config(config, *, num_devices: int | None) -> None:
  """Raises ConfigError listing every problem (see problems)."""
  found = problems(config, num_devices=num_devices)
  if found:
    raise ConfigError(found)
