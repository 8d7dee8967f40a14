"""Frozen DINO v1 ViT for SGC's spatial affinity (method §3.1): Flax model and weight loading."""

from ssr_jax.dino.convert import load_dino, weights_fingerprint
from ssr_jax.dino.model import (
  CONFIGS,
  DINO,
  IMAGENET_MEAN,
  IMAGENET_STD,
  DINOConfig,
  init_params,
  normalize,
)

__all__ = [
  "CONFIGS",
  "DINO",
  "DINOConfig",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "init_params",
  "load_dino",
  "normalize",
  "weights_fingerprint",
]
