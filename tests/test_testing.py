"""ssr_jax.testing: the tiny CLIP, random frozen weights and fake batches tests share."""

import jax.numpy as jnp
import numpy as np

from ssr_jax import testing
from ssr_jax.clip import CLIP


def test_tiny_clip_config_overrides():
  assert testing.tiny_clip_config() == testing.TINY_CLIP
  c = testing.tiny_clip_config(vision_layers=2)
  assert c.vision_layers == 2 and c.vision_width == testing.TINY_CLIP.vision_width


def test_random_frozen_shapes_norms_and_compute_dtype():
  clip = CLIP(testing.TINY_CLIP, dtype=jnp.bfloat16)
  frozen = testing.random_frozen(clip, num_fg=3, num_bg=2, seed=1)
  assert set(frozen) == {"clip", "text_fg", "text_bg"}
  assert frozen["text_fg"].shape == (3, 16) and frozen["text_bg"].shape == (2, 16)
  np.testing.assert_allclose(np.linalg.norm(frozen["text_fg"], axis=-1), 1.0, rtol=1e-5)
  # Stored as load_clip stores them: matmul weights in the compute dtype, norms in float32.
  visual = frozen["clip"]["visual"]
  assert visual["conv1"]["kernel"].dtype == jnp.bfloat16
  assert visual["ln_post"]["scale"].dtype == jnp.float32
  again = testing.random_frozen(clip, num_fg=3, num_bg=2, seed=1)
  np.testing.assert_array_equal(frozen["text_bg"], again["text_bg"])


def test_fake_batch():
  b = testing.fake_batch(4, 64, 3, seed=0)
  assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.uint8
  assert b["labels"].shape == (4, 3) and set(b["labels"].sum(1)) <= {2.0, 3.0}
  assert b["superpixels"].shape == (4, 64, 64) and b["superpixels"].dtype == np.int32
  assert len(np.unique(b["superpixels"][0])) == 4  # 32-pixel blocks.
  assert b["mask"].shape == (4, 64, 64) and list(b["index"]) == [0, 1, 2, 3]
  one = testing.fake_batch(2, 32, 1)
  assert (one["labels"] == 1.0).all()  # Fewer classes than 2-3: every one present.
