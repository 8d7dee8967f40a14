"""Exact parameter counts of the named DINO configs (shape evaluation only, nothing allocated)."""

import math

import jax
import jax.numpy as jnp
import pytest

from ssr_jax.dino import CONFIGS, DINO

# Backbone totals (no pooler, no projection head): timm's vit_small_patch16_224 is 22,050,664
# with its 385,000-parameter ImageNet classifier, 21,665,664 without; vit_base_patch16_224
# 86,567,656 with its 769,000-parameter classifier.
EXPECTED = {"ViT-S/16": 21_665_664, "ViT-B/16": 85_798_656, "ViT-S/8": 21_670_272}


def _formula(c) -> int:
  """Independent count: patch conv, CLS, positions, blocks, final LayerNorm."""
  d, m = c.width, c.mlp
  block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
  embed = 3 * c.patch_size**2 * d + d + d + (c.grid**2 + 1) * d
  return embed + c.layers * block + 2 * d


def _count(c) -> int:
  images = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(DINO(c).init, jax.random.key(0), images)["params"]
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_every_config_is_pinned():
  assert set(EXPECTED) == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_param_count(name):
  c = CONFIGS[name]
  assert _count(c) == _formula(c) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_param_count_matches_transformers(name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  c = CONFIGS[name]
  hf = transformers.ViTConfig(
    hidden_size=c.width,
    num_hidden_layers=c.layers,
    num_attention_heads=c.heads,
    intermediate_size=c.mlp,
    image_size=c.image_size,
    patch_size=c.patch_size,
  )
  with torch.device("meta"):  # Shapes only: no 86M-parameter allocation.
    vit = transformers.ViTModel(hf, add_pooling_layer=False)
  assert sum(p.numel() for p in vit.parameters()) == EXPECTED[name]
