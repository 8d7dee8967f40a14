"""Exact parameter counts of the named CLIP configs (shape evaluation only, nothing allocated)."""

import math

import jax
import jax.numpy as jnp
import pytest

from ssr_jax.clip import CLIP, CONFIGS

# OpenAI's published totals (sum of numel over the released state dicts, logit_scale included).
EXPECTED = {"ViT-B/16": 149_620_737, "ViT-B/32": 151_277_313, "ViT-L/14": 427_616_513}


def _formula(c) -> int:
  """Independent count: conv, CLS, positions, LNs, blocks (12W^2 + 13W each), projections."""
  block = lambda w: 3 * w * w + 3 * w + w * w + w + 4 * w + 4 * w * w + 4 * w + 4 * w * w + w
  vision = 3 * c.patch_size**2 * c.vision_width + c.vision_width
  vision += (c.grid**2 + 1) * c.vision_width + 4 * c.vision_width
  vision += c.vision_layers * block(c.vision_width) + c.vision_width * c.embed_dim
  text = (c.vocab_size + c.context_length) * c.text_width + 2 * c.text_width
  text += c.text_layers * block(c.text_width) + c.text_width * c.embed_dim
  return vision + text + 1


def test_every_config_is_pinned():
  assert set(EXPECTED) == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_param_count(name):
  c = CONFIGS[name]
  shapes = jax.eval_shape(
    CLIP(c).init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, c.image_size, c.image_size, 3), jnp.float32),
    jax.ShapeDtypeStruct((1, c.context_length), jnp.int32),
  )["params"]
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert n == _formula(c) == EXPECTED[name]
