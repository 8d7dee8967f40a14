"""Exact parameter counts of the named CLIP configs (shape evaluation only, nothing allocated)."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax import testing
from ssr_jax.clip import CLIP, CONFIGS, init_params
from ssr_jax.clip.model import cast_for_compute

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


def test_cast_for_compute_is_bit_identical_and_keeps_norms_float32():
  cfg = testing.tiny_clip_config(vision_layers=2)
  model = CLIP(cfg, dtype=jnp.bfloat16)
  params = init_params(model, jax.random.key(0))
  cast = cast_for_compute(params, jnp.bfloat16)
  flat = flax.traverse_util.flatten_dict(cast)
  low = {k for k, v in flat.items() if v.dtype == jnp.bfloat16}
  # Exactly the Dense/Conv weights: in_proj, out_proj, c_fc, c_proj (kernel + bias) per block, and
  # conv1's kernel; LayerNorms, embeddings, projections and logit_scale stay float32.
  assert low == {k for k in flat if k[-1] in ("kernel", "bias") and k[:-1] + ("kernel",) in flat}
  assert len(low) == 8 * (cfg.vision_layers + cfg.text_layers) + 1
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ids = jnp.array([[1, 5, 63, 0, 0, 0, 0, 0]], jnp.int32)
  feats = lambda p: model.apply({"params": p}, images, method=CLIP.image_features)  # noqa: E731
  text = lambda p: model.apply({"params": p}, ids, method=CLIP.encode_text)  # noqa: E731
  for a, b in zip(
    jax.tree.leaves((feats(params), text(params))), jax.tree.leaves((feats(cast), text(cast)))
  ):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
