"""The tiny CLIP that ships with the package: intact (sha256 sidecar), made by configs/demo.py's
pretraining settings, refused with the flag to use when a setting differs; pruning its unused
vocabulary rows leaves every text embedding of the kept texts unchanged."""

import jax
import numpy as np
import pytest

from configs import demo as demo_config
from ssr_jax import demo
from ssr_jax.clip import convert
from ssr_jax.clip.model import CLIP, CLIPConfig, init_params
from ssr_jax.clip.tokenizer import tokenize


def test_shipped_clip_matches_demo_config():
  config = demo_config.get_config()
  demo.check_shipped_clip(config, demo.SHIPPED_CLIP)  # Raises on a hash or settings mismatch.
  cfg, flat, meta = convert.load_converted(demo.SHIPPED_CLIP)
  assert cfg == demo.tiny_clip_config(config)
  info = meta["extra"]["demo_pretraining"]
  assert info["settings"] == demo.pretraining_settings(config)
  assert info["zero_shot_top1_present"] > 0.5  # Far above chance for a CLIP that learned.


def test_shipped_clip_refused_on_other_settings_or_damage(tmp_path):
  config = demo_config.get_config()
  config.demo.clip_width = 64
  with pytest.raises(demo.DemoError, match="pretrain_clip=True"):
    demo.check_shipped_clip(config, demo.SHIPPED_CLIP)
  damaged = tmp_path / "tiny_clip.npz"
  data = bytearray(demo.SHIPPED_CLIP.read_bytes())
  data[len(data) // 2] ^= 0xFF  # One flipped byte.
  damaged.write_bytes(bytes(data))
  (tmp_path / "tiny_clip.npz.sha256").write_text(
    (demo.SHIPPED_CLIP.parent / "tiny_clip.npz.sha256").read_text()
  )
  with pytest.raises(demo.DemoError, match="does not match its sha256"):
    demo.check_shipped_clip(demo_config.get_config(), damaged)


def test_pruned_vocabulary_keeps_text_embeddings():
  cfg = CLIPConfig(
    embed_dim=16,
    image_size=16,
    patch_size=8,
    vision_width=16,
    vision_layers=1,
    vision_heads=2,
    context_length=12,
    text_width=16,
    text_layers=1,
    text_heads=2,
  )
  model = CLIP(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  texts = ["a photo of a horse.", "a boat on water.", "grass"]
  pruned = demo._prune_token_rows(params, texts, cfg.context_length)
  ids = tokenize(texts, context_length=cfg.context_length)
  enc = lambda p: model.apply({"params": p}, ids, method=model.encode_text)
  np.testing.assert_array_equal(np.asarray(enc(pruned)), np.asarray(enc(params)))
  table = np.asarray(pruned["text"]["token_embedding"]["embedding"])
  assert np.count_nonzero(table.any(axis=1)) == len(np.unique(ids))
