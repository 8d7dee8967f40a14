"""Hugging Face weights directories (config.json + model.safetensors): edited copies for bad-input
tests of the CLIP and DINO loaders, and random ones written without torch."""

import json
import shutil


def edited_copy(hf_dir, dst, *, config_edit=None, weights_edit=None):
  """A copy of hf_dir at dst with config_edit(config dict) and weights_edit(state dict) applied
  in place; returns dst."""
  from safetensors.numpy import load_file, save_file

  shutil.copytree(hf_dir, dst)
  if config_edit:
    cfg = json.loads((dst / "config.json").read_text())
    config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
  if weights_edit:
    sd = load_file(str(dst / "model.safetensors"))
    weights_edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
  return dst


def random_hf_clip(dst, cfg, *, seed=0):
  """A Hugging Face CLIP directory (config.json + model.safetensors, transformers' key names)
  of architecture cfg (a CLIPConfig) with random weights, written without torch; returns dst."""
  from ssr_jax.clip import convert

  config = dict(
    projection_dim=cfg.embed_dim,
    text_config=dict(
      hidden_size=cfg.text_width,
      num_hidden_layers=cfg.text_layers,
      num_attention_heads=cfg.text_heads,
      intermediate_size=cfg.text_mlp or 4 * cfg.text_width,
      max_position_embeddings=cfg.context_length,
      vocab_size=cfg.vocab_size,
    ),
    vision_config=dict(
      hidden_size=cfg.vision_width,
      num_hidden_layers=cfg.vision_layers,
      num_attention_heads=cfg.vision_heads,
      intermediate_size=cfg.vision_mlp or 4 * cfg.vision_width,
      image_size=cfg.image_size,
      patch_size=cfg.patch_size,
    ),
  )
  return _random_hf_dir(dst, config, convert._hf_spec(cfg), seed)


def random_hf_dino(dst, cfg, *, seed=0):
  """A Hugging Face ViT directory (a facebook/dino-vits16-style ViTModel, no pooler) of
  architecture cfg (a DINOConfig) with random weights, written without torch; returns dst."""
  from ssr_jax.dino import convert

  config = dict(
    hidden_size=cfg.width,
    num_hidden_layers=cfg.layers,
    num_attention_heads=cfg.heads,
    intermediate_size=cfg.mlp,
    image_size=cfg.image_size,
    patch_size=cfg.patch_size,
    layer_norm_eps=cfg.layer_norm_eps,
    qkv_bias=cfg.qkv_bias,
  )
  return _random_hf_dir(dst, config, convert._hf_spec(cfg), seed)


def _random_hf_dir(dst, config, spec, seed):
  """config.json + model.safetensors with an array of each shape the converter's spec expects
  (LayerNorm scales near 1, everything else small)."""
  import numpy as np
  from safetensors.numpy import save_file

  rng = np.random.default_rng(seed)
  sd = {}
  for key, (ours, shape, _) in spec.items():
    base = 1.0 if ours.endswith("/scale") else 0.0
    sd[key] = np.asarray(base + 0.05 * rng.standard_normal(shape), np.float32)
  dst.mkdir(parents=True, exist_ok=True)
  (dst / "config.json").write_text(json.dumps(config))
  save_file(sd, str(dst / "model.safetensors"))
  return dst
