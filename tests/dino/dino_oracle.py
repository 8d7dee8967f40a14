"""Helpers for the DINO tests: a tiny transformers ViT config, noise, official DINO key names."""

import re


def tiny_vit_config(**overrides):
  import transformers

  # intermediate_size 96 (not 4 x 64) so the MLP width is really read from the file; width 64 has
  # no entry in the loader's heads-by-width table, so .pth tests pass heads= explicitly.
  kw = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=96,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
  )
  return transformers.ViTConfig(**{**kw, **overrides})


def perturb_(model, seed=0):
  """Adds noise to every parameter so LayerNorm scales/biases are not the 1/0 defaults."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))


def to_dino_state_dict(vit) -> dict:
  """transformers ViTModel state dict -> the official DINO (timm/DeiT) key names and layout."""
  import torch

  sd = {k: v.detach().clone() for k, v in vit.state_dict().items() if not k.startswith("pooler.")}
  out = {
    "cls_token": sd.pop("embeddings.cls_token"),
    "pos_embed": sd.pop("embeddings.position_embeddings"),
  }
  for p in ("weight", "bias"):
    out[f"patch_embed.proj.{p}"] = sd.pop(f"embeddings.patch_embeddings.projection.{p}")
    out[f"norm.{p}"] = sd.pop(f"layernorm.{p}")
  for k in sorted(sd):
    m = re.match(r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(\w+)$", k)
    if not m:
      continue
    i, p = m.groups()
    s = f"encoder.layer.{i}."
    out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(
      [sd.pop(f"{s}attention.attention.{n}.{p}") for n in ("query", "key", "value")], 0
    )
  for k in list(sd):
    i, rest = re.match(r"encoder\.layer\.(\d+)\.(.+)$", k).groups()
    name = {
      "attention.output.dense": "attn.proj",
      "layernorm_before": "norm1",
      "layernorm_after": "norm2",
      "intermediate.dense": "mlp.fc1",
      "output.dense": "mlp.fc2",
    }[rest.rsplit(".", 1)[0]]
    out[f"blocks.{i}.{name}.{rest.rsplit('.', 1)[1]}"] = sd.pop(k)
  return out
