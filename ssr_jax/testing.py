"""Random stand-ins for tests and benchmarks: a tiny CLIP and DINO, random frozen weights, a fake
batch.

Shipped with the package (as vit_jax's test_utils) so that tests, `benchmarks/` and downstream
code build the same small models instead of each restating a CLIPConfig literal. Nothing here
reads files or a config module; `random_build` is `experiment.build` with random weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax import experiment
from ssr_jax.clip.model import CLIP, CLIPConfig, cast_for_compute, init_params
from ssr_jax.clip.preprocess import compute_dtype
from ssr_jax.dino import model as dino_lib
from ssr_jax.dino.model import DINO, DINOConfig

# 4 visual layers: enough for GradCAM's attention layers (model.cam.num_attn_layers = 3 in the
# small benchmarks) and RFM. 32 px / patch 8 = a 4x4 position grid, interpolated to other sizes.
TINY_CLIP = CLIPConfig(
  embed_dim=16,
  image_size=32,
  patch_size=8,
  vision_width=24,
  vision_layers=4,
  vision_heads=4,
  context_length=8,
  vocab_size=64,
  text_width=16,
  text_layers=1,
  text_heads=2,
)

# A tiny CLIP that reads real prompts: the full BPE vocabulary (the tokenizer's ids reach
# 49,407), a 2x2 patch grid on 16 px images.
TINY_TEXT_CLIP = CLIPConfig(
  embed_dim=16,
  image_size=16,
  patch_size=8,
  vision_width=16,
  vision_layers=1,
  vision_heads=2,
  context_length=12,
  text_width=16,
  text_layers=1,
  text_heads=2,
)

# The DINO SGC fuses with CLIP's attention: 4 layers (model.cam.dino_layers), same 32 px grid.
TINY_DINO = DINOConfig(image_size=32, patch_size=8, width=24, layers=4, heads=4, mlp=48)


def tiny_clip_config(**overrides) -> CLIPConfig:
  """TINY_CLIP with some fields replaced, e.g. tiny_clip_config(vision_layers=2)."""
  return dataclasses.replace(TINY_CLIP, **overrides)


def random_frozen(clip: CLIP, *, num_fg: int, num_bg: int, seed: int = 0) -> dict:
  """The frozen pytree the SSR task takes, {clip, text_fg, text_bg}, with random values.

  clip: the CLIP module (its dtype is the compute dtype: params are cast as load_clip does);
  num_fg: foreground classes C (background excluded); num_bg: background names K.
  Returns clip params, text_fg float32 [C, D] and text_bg float32 [K, D], rows unit-norm.
  """
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  d = clip.cfg.embed_dim
  return dict(
    clip=cast_for_compute(jax.jit(lambda k: init_params(clip, k))(keys[0]), clip.dtype),
    text_fg=unit(jax.random.normal(keys[1], (num_fg, d))),
    text_bg=unit(jax.random.normal(keys[2], (num_bg, d))),
  )


def fake_batch(
  batch_size: int, crop_size: int, num_fg: int, *, seed: int = 0, superpixel_size: int = 32
) -> dict:
  """A training batch as the input pipeline yields it (numpy), with VOC-like labels.

  image uint8 [B, S, S, 3] random; labels float32 [B, C] multi-hot with 2-3 classes per image
  (fewer when C is smaller); superpixels int32 [B, S, S], square blocks of superpixel_size pixels
  (about 100 in a 320 crop at 32); clusters int32 [B, S, S], colour regions 0..4 (superpixel id
  mod 5); mask uint8 [B, S, S] zeros; index int32 [B].
  """
  rng = np.random.default_rng(seed)
  b, s = batch_size, crop_size
  labels = np.zeros((b, num_fg), np.float32)
  for i in range(b):
    k = min(int(rng.integers(2, 4)), num_fg)
    labels[i, rng.choice(num_fg, size=k, replace=False)] = 1.0
  yy, xx = np.mgrid[:s, :s] // superpixel_size
  sp = yy * (s // superpixel_size + 1) + xx
  return dict(
    image=rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
    labels=labels,
    superpixels=np.ascontiguousarray(np.broadcast_to(sp, (b, s, s)).astype(np.int32)),
    clusters=np.ascontiguousarray(np.broadcast_to(sp % 5, (b, s, s)).astype(np.int32)),
    mask=np.zeros((b, s, s), np.uint8),
    index=np.arange(b, dtype=np.int32),
  )


def random_build(
  config,
  *,
  clip_cfg: CLIPConfig | None = None,
  dino_cfg: DINOConfig | None = None,
  seed: int = 0,
):
  """(task, frozen) as `experiment.build(config)` makes them, with random weights.

  config: the full ConfigDict (model, loss, data.num_classes, data.color_clusters are read);
  clip_cfg: the CLIP architecture (default TINY_CLIP); dino_cfg: the DINO's, built when
  model.cam.dino_weight > 0 (default TINY_DINO with CLIP's patch size); the compute dtype is
  config.model.dtype.
  """
  dtype = compute_dtype(config.model.dtype)
  clip = CLIP(clip_cfg or TINY_CLIP, dtype=dtype)
  frozen = random_frozen(
    clip, num_fg=config.data.num_classes - 1, num_bg=len(config.model.bg_names), seed=seed
  )
  dino = None
  if config.model.cam.dino_weight > 0:
    cfg = dino_cfg or dataclasses.replace(TINY_DINO, patch_size=clip.cfg.patch_size)
    dino, frozen["dino"] = random_dino(cfg, dtype=dtype, seed=seed)
  return experiment.make_task(config, clip=clip, dino=dino), frozen


def random_dino(cfg: DINOConfig = TINY_DINO, *, dtype=jnp.float32, seed: int = 0):
  """(DINO module, params) of architecture cfg, random weights cast as load_dino casts them."""
  dino = DINO(cfg, dtype=dtype)
  params = dino_lib.init_params(dino, jax.random.PRNGKey(seed + 7))
  return dino, cast_for_compute(params, dtype)
