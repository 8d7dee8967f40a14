"""CLIP's input contract: pixel normalisation statistics and the compute dtypes of the towers."""

import jax.numpy as jnp

# 0-255 RGB statistics. WeCLIP feeds CLIP ImageNet statistics, not CLIP's own (§1.1).
NORMALIZATION = {
  "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
  "clip": ((122.771, 116.746, 104.094), (68.501, 66.632, 70.323)),
}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.model.dtype values.


def compute_dtype(name):
  """The jnp dtype named by config.model.dtype."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: use one of {sorted(DTYPES)}")
  return DTYPES[name]


def normalize(images, kind):
  """uint8 or float 0-255 images [B, H, W, 3] -> float32 normalised with the named statistics."""
  if kind not in NORMALIZATION:
    raise ValueError(f"model.normalization={kind!r}: use one of {sorted(NORMALIZATION)}")
  mean, std = (jnp.asarray(v, jnp.float32) for v in NORMALIZATION[kind])
  return (images.astype(jnp.float32) - mean) / std
