"""The tiny CLIP and tiny DINO that ship with the package: intact (sha256 sidecar), made by
configs/demo.py's pretraining settings, refused with the flag to use when a setting differs;
pruning the CLIP's unused vocabulary rows leaves every text embedding of the kept texts
unchanged; prepare() points dino.weights at the shipped DINO or pretrains one in the workdir."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo as demo_config
from ssr_jax import demo
from ssr_jax.clip import convert
from ssr_jax.clip.model import CLIP, init_params
from ssr_jax.clip.tokenizer import tokenize
from ssr_jax.data import synthetic
from ssr_jax.dino import convert as dino_convert
from ssr_jax.dino import load_dino
from ssr_jax.dino import pretrain as dino_pretrain
from ssr_jax.testing import TINY_TEXT_CLIP


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
  cfg = TINY_TEXT_CLIP
  model = CLIP(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  texts = ["a photo of a horse.", "a boat on water.", "grass"]
  pruned = demo._prune_token_rows(params, texts, cfg.context_length)
  ids = tokenize(texts, context_length=cfg.context_length)
  enc = lambda p: model.apply({"params": p}, ids, method=model.encode_text)
  np.testing.assert_array_equal(np.asarray(enc(pruned)), np.asarray(enc(params)))
  table = np.asarray(pruned["text"]["token_embedding"]["embedding"])
  assert np.count_nonzero(table.any(axis=1)) == len(np.unique(ids))


def test_shipped_dino_matches_demo_config():
  config = demo_config.get_config()
  demo.check_shipped_dino(config, demo.SHIPPED_DINO)  # Raises on a hash or settings mismatch.
  model, params = load_dino(demo.SHIPPED_DINO)
  assert model.cfg == demo.tiny_dino_config(config)
  info = dino_convert.read_metadata(demo.SHIPPED_DINO)["extra"]["demo_pretraining"]
  assert info["settings"] == json.loads(json.dumps(demo.dino_pretraining_settings(config)))
  attn = model.apply({"params": params}, jnp.zeros((1, 96, 96, 3)), method=model.attention_maps)
  assert attn.shape == (config.demo.dino_layers, 1, config.demo.dino_heads, 145, 145)
  # The recorded purity is the shipped weights': recomputed here on the val split, regenerated.
  sc = config.data.synthetic
  val = synthetic.generate(sc.num_val, size=sc.image_size, seed=sc.seed, stream=1)
  segments = dino_pretrain.patch_segments(val["mask"], config.demo.dino_patch)
  attn = dino_pretrain.dino_attention(model, params, val["image"])
  fused = attn[-config.model.cam.dino_layers :].mean(axis=0)
  for kind, balanced in (("plain", False), ("balanced", True)):
    recorded = info["attention_purity"][kind]
    got = dino_pretrain.attention_purity(fused, segments, balanced=balanced)
    assert got == pytest.approx(recorded["dino"]["fused"], abs=1e-4)
    chance = dino_pretrain.uniform_purity(segments, balanced=balanced)
    assert recorded["uniform"]["fused"] == pytest.approx(chance, abs=1e-6)
  assert 0.5 < info["clip_zero_shot_map"] <= 1.0  # Far above chance for a CLIP that learned.


def test_shipped_dino_refused_on_other_settings_or_damage(tmp_path):
  config = demo_config.get_config()
  config.demo.dino_steps += 1
  with pytest.raises(demo.DemoError, match="pretrain_dino=True"):
    demo.check_shipped_dino(config, demo.SHIPPED_DINO)
  damaged = tmp_path / "tiny_dino.npz"
  data = bytearray(demo.SHIPPED_DINO.read_bytes())
  data[len(data) // 2] ^= 0xFF
  damaged.write_bytes(bytes(data))
  (tmp_path / "tiny_dino.npz.sha256").write_text(
    (demo.SHIPPED_DINO.parent / "tiny_dino.npz.sha256").read_text()
  )
  with pytest.raises(demo.DemoError, match="does not match its sha256"):
    demo.check_shipped_dino(demo_config.get_config(), damaged)


def test_prepare_sets_dino_weights(tmp_path):
  # The shipped file by default...
  config = demo_config.get_config()
  assert demo._weights(demo._DINO, config, str(tmp_path)) == str(demo.SHIPPED_DINO)
  # ...and with pretrain_dino, one pretrained in the workdir (tiny data and model here).
  config.data.synthetic.num_train = 4
  config.data.synthetic.num_val = 2
  config.data.synthetic.image_size = 16
  config.data.crop_size = 16
  config.clip.weights = str(demo.SHIPPED_CLIP)  # Kept as given: no CLIP pretraining.
  config.demo.pretrain_dino = True
  config.demo.dino_steps = 1
  config.demo.dino_batch_size = 2
  config.demo.dino_width = 16
  config.demo.dino_layers = 1
  config.demo.dino_heads = 2
  prepared = demo.prepare(config, str(tmp_path))
  assert prepared.dino.weights == str(tmp_path / "dino" / "tiny_dino.npz")
  assert prepared.clip.weights == str(demo.SHIPPED_CLIP)
  model, _ = load_dino(prepared.dino.weights)
  assert model.cfg == demo.tiny_dino_config(config)
  info = dino_convert.read_metadata(prepared.dino.weights)["extra"]["demo_pretraining"]
  assert info["command"].startswith("python ")
  assert 0.0 < info["clip_zero_shot_map"] <= 1.0
  for table in info["attention_purity"].values():
    assert set(table) == {"uniform", "random", "dino", "clip"}
    assert all(set(p) == {"layers", "mean", "fused"} for p in table.values())
  assert (tmp_path / "dino_pretrain" / "checkpoints" / "1").is_dir()  # Resumable.
  assert not config.dino.weights  # prepare() returned a new config.
  stamp = os.stat(prepared.dino.weights).st_mtime_ns
  demo.prepare(config, str(tmp_path))  # Same settings: the file is reused, not remade.
  assert os.stat(prepared.dino.weights).st_mtime_ns == stamp


def test_dino_stream_is_the_generators_unlabelled_stream():
  config = demo_config.get_config()
  config.demo.dino_batch_size = 2
  config.data.synthetic.image_size = 16
  stream = demo.dino_stream(config)
  first = stream(3)
  assert first.shape == (2, 16, 16, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(stream(3), first)  # A pure function of the step...
  assert not np.array_equal(stream(4), first)  # ...with new images every step...
  train = synthetic.generate(2, size=16, seed=config.data.synthetic.seed, start=6)["image"]
  assert not np.array_equal(train, first)  # ...that are not the training split's.


@pytest.mark.parametrize("has_tfds", [True, False])
def test_prepare_builds_tfds_or_falls_back_to_folders(tmp_path, monkeypatch, has_tfds):
  """The demo reads its TFDS build; on hosts without tensorflow-datasets, its folders."""
  if has_tfds:
    pytest.importorskip("tensorflow_datasets")
  else:
    real = demo.importlib.util.find_spec
    hide = lambda name, *a: None if name == "tensorflow_datasets" else real(name, *a)
    monkeypatch.setattr(demo.importlib.util, "find_spec", hide)
  config = demo_config.get_config()
  config.data.synthetic.num_train = 4
  config.data.synthetic.num_val = 2
  config.data.synthetic.image_size = 16
  config.data.crop_size = 16
  config.clip.weights = config.dino.weights = "given"  # Kept as given: weights are not the point.
  prepared = demo.prepare(config, str(tmp_path))
  assert prepared.data.source == ("tfds" if has_tfds else "files")
  built = list((tmp_path / "tfds").glob("ssr_synthetic/*/1.0.0/dataset_info.json"))
  assert len(built) == (1 if has_tfds else 0)
