"""Frozen CLIP for ssr_jax: Flax model, weight loading, tokenizer and text classifiers."""

from ssr_jax.clip.convert import load_clip, weights_fingerprint
from ssr_jax.clip.model import CLIP, CONFIGS, CLIPConfig, init_params
from ssr_jax.clip.prompts import text_classifier
from ssr_jax.clip.tokenizer import load_tokenizer, tokenize

__all__ = [
  "CLIP",
  "CLIPConfig",
  "CONFIGS",
  "init_params",
  "load_clip",
  "load_tokenizer",
  "text_classifier",
  "tokenize",
  "weights_fingerprint",
]
