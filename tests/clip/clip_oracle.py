"""Helpers for the CLIP tests: a tiny transformers CLIP config, noise, random token ids."""

import numpy as np

VOCAB = 100
EOS = VOCAB - 1  # The largest id, so first-EOS pooling (transformers) equals argmax (ours).
BOS = VOCAB - 2
CONTEXT = 16


def tiny_hf_config(vision_mlp=512, text_mlp=512):
  """vision_mlp / text_mlp: intermediate_size of each tower (4 x 128 by default)."""
  import transformers

  # Widths of 128 give 2 heads both from config.json and from OpenAI's width // 64 rule.
  return transformers.CLIPConfig(
    text_config=dict(
      hidden_size=128,
      intermediate_size=text_mlp,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=CONTEXT,
      vocab_size=VOCAB,
      eos_token_id=EOS,
      bos_token_id=BOS,
      pad_token_id=0,
    ),
    vision_config=dict(
      hidden_size=128,
      intermediate_size=vision_mlp,
      num_hidden_layers=3,
      num_attention_heads=2,
      image_size=32,
      patch_size=8,
    ),
    projection_dim=32,
  )


def perturb_(model, seed=0):
  """Adds noise to every parameter so LayerNorm scales/biases are not the 1/0 defaults."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))


def random_ids(rng, n, length=CONTEXT):
  """[n, length] int32: BOS, random tokens, EOS, zero padding (one row fills the context)."""
  ids = np.zeros((n, length), np.int32)
  for i in range(n):
    k = length - 2 if i == 0 else int(rng.integers(1, length - 2))
    ids[i, 0] = BOS
    ids[i, 1 : 1 + k] = rng.integers(1, BOS, size=k)
    ids[i, 1 + k] = EOS
  return ids
