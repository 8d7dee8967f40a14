"""DINO loading: parity with transformers' ViTModel (attentions, last hidden state, interpolated
positions), the official .pth format and its .npz cache, fingerprints, and bad weight files."""

import hashlib
import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dino_oracle import to_dino_state_dict
from flax import traverse_util

from ssr_jax.dino import DINO, load_dino, normalize, weights_fingerprint
from ssr_jax.dino import convert as dino_convert
from tests.hf_files import edited_copy

torch = pytest.importorskip("torch")

# Measured (transformers 4.57.6, torch 2.13 CPU, float32, jax matmul precision "highest"): max
# relative error ~3e-7 for attentions and hidden states, at the native 32 px and interpolated.
REL_TOL = 1e-4


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _assert_same_params(a, b):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _theirs(tm, images):
  """(attentions [L, B, heads, T, T], last_hidden_state [B, T, D]) from the torch ViTModel."""
  with torch.no_grad():
    out = tm(
      pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
      output_attentions=True,
      interpolate_pos_encoding=True,  # At the native size it returns the table as is.
    )
  return np.stack([a.numpy() for a in out.attentions]), out.last_hidden_state.numpy()


def _assert_close(got, want):
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel <= REL_TOL, rel


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (16, 64)], ids=["native", "48x64", "16x64"])
def test_parity_with_transformers(hf_vit, size):
  # 16x64 has the native patch count (2 x 8 = 4 x 4) but not its shape: transformers still
  # interpolates there, and so must we.
  d, tm = hf_vit
  model, params = load_dino(d)
  images = np.random.default_rng(0).standard_normal((2, *size, 3)).astype(np.float32)
  attn = model.apply({"params": params}, images, method=model.attention_maps)
  hidden = model.apply({"params": params}, images)
  want_attn, want_hidden = _theirs(tm, images)
  t = 1 + (size[0] // 8) * (size[1] // 8)
  assert attn.shape == (3, 2, 4, t, t) == want_attn.shape
  assert hidden.shape == (2, t, 64) == want_hidden.shape
  _assert_close(np.asarray(attn), want_attn)
  _assert_close(np.asarray(hidden), want_hidden)
  np.testing.assert_allclose(np.asarray(attn).sum(-1), 1.0, rtol=1e-5)


def test_size_not_multiple_of_patch(hf_vit):
  model, params = load_dino(hf_vit[0])
  with pytest.raises(ValueError, match=r"36x32 is not a multiple of the DINO patch size 8"):
    model.apply({"params": params}, jnp.zeros((1, 36, 32, 3)), method=model.attention_maps)


def test_vit_prefix_and_safetensors_path(hf_vit, tmp_path):
  """Keys of a model wrapping ViTModel (`vit.` prefix), and the weights file given directly."""
  from safetensors.numpy import load_file, save_file

  d, _ = hf_vit
  _, ref = load_dino(d)
  shutil.copytree(d, tmp_path / "p")
  sd = load_file(str(tmp_path / "p" / "model.safetensors"))
  save_file({f"vit.{k}": v for k, v in sd.items()}, str(tmp_path / "p" / "model.safetensors"))
  _, params = load_dino(tmp_path / "p" / "model.safetensors")
  _assert_same_params(params, ref)


def test_official_pth_and_cache(hf_vit, tmp_path, monkeypatch):
  d, tm = hf_vit
  _, ref = load_dino(d)
  pth = tmp_path / "dino_tiny.pth"
  torch.save(to_dino_state_dict(tm), pth)
  cache_dir = tmp_path / "cache"
  model, params = load_dino(pth, heads=4, cache_dir=cache_dir)
  _assert_same_params(params, ref)
  assert model.cfg == load_dino(d)[0].cfg  # Shapes give everything but the heads...
  assert model.cfg.layer_norm_eps == 1e-6  # ...and DINO's eps (the tiny HF config uses it too).
  (cache,) = cache_dir.iterdir()

  # Later loads read the cache: torch is neither imported nor needed.
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  _, again = load_dino(pth, heads=4, cache_dir=cache_dir)
  _, direct = load_dino(cache, heads=4)  # The .npz itself is a valid source.
  _assert_same_params(again, ref)
  _assert_same_params(direct, ref)
  sha = hashlib.sha256(pth.read_bytes()).hexdigest()
  assert weights_fingerprint(pth, cache_dir=cache_dir) == weights_fingerprint(cache) == sha
  assert dino_convert.load_converted(cache)[2]["sha256"] == sha
  monkeypatch.undo()

  # A changed source is converted again; without cache_dir the cache goes to the user cache
  # dir, never beside the file.
  calls = []
  real = dino_convert._read_torch
  monkeypatch.setattr(dino_convert, "_read_torch", lambda p: calls.append(p) or real(p))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  beside = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name != "xdg")
  before = beside()
  load_dino(pth, heads=4)
  (default,) = (tmp_path / "xdg" / "ssr_jax").iterdir()
  assert default.name.startswith("dino_tiny.pth-") and len(calls) == 1 and beside() == before
  load_dino(pth, heads=4)
  assert len(calls) == 1
  torch.save(to_dino_state_dict(tm), pth)  # Same tensors, new mtime.
  load_dino(pth, heads=4)
  assert len(calls) == 2


def test_training_checkpoint_teacher(hf_vit, tmp_path):
  """DINO's checkpoint.pth: {"student", "teacher", ...} with module./backbone./head. prefixes."""
  d, tm = hf_vit
  _, ref = load_dino(d)
  sd = to_dino_state_dict(tm)
  teacher = {f"backbone.{k}": v for k, v in sd.items()}
  teacher["head.mlp.0.weight"] = torch.zeros(8, 64)
  student = {f"module.{k}": v for k, v in teacher.items()}
  torch.save({"teacher": teacher, "student": student, "epoch": 3}, tmp_path / "checkpoint.pth")
  _, params = load_dino(tmp_path / "checkpoint.pth", heads=4, cache_dir=tmp_path)
  _assert_same_params(params, ref)


def test_heads_needed_for_unknown_width(hf_vit, tmp_path):
  pth = tmp_path / "w64.pth"
  torch.save(to_dino_state_dict(hf_vit[1]), pth)
  with pytest.raises(ValueError, match=r"w64.pth: no known head count for width 64.*heads="):
    load_dino(pth, cache_dir=tmp_path)
  with pytest.raises(ValueError, match=r"width 64 is not a multiple of heads=5"):
    load_dino(pth, heads=5, cache_dir=tmp_path)


def test_pth_bad_keys(hf_vit, tmp_path):
  sd = to_dino_state_dict(hf_vit[1])
  del sd["blocks.1.mlp.fc2.bias"]
  sd["blocks.0.attn.proj.weight"] = torch.zeros(64, 63)
  sd["head.weight"] = torch.zeros(10, 64)
  pth = tmp_path / "bad.pth"
  torch.save(sd, pth)
  with pytest.raises(ValueError) as e:
    load_dino(pth, heads=4, cache_dir=tmp_path)
  msg = str(e.value)
  assert str(pth) in msg
  assert "missing key blocks.1.mlp.fc2.bias" in msg
  assert "wrong shape blocks.0.attn.proj.weight: expected (64, 64), got (64, 63)" in msg
  assert "unknown key head.weight" in msg
  assert not list(tmp_path.glob("*.npz"))  # Nothing cached from a failed conversion.


def test_missing_unknown_and_misshaped_keys(hf_vit, tmp_path):
  def edit(sd):
    del sd["encoder.layer.2.attention.attention.key.bias"]
    sd["encoder.layer.0.intermediate.dense.weight"] = np.zeros((128, 64), np.float32)
    sd["classifier.weight"] = np.zeros((10, 64), np.float32)

  d = edited_copy(hf_vit[0], tmp_path / "u", weights_edit=edit)
  with pytest.raises(ValueError) as e:
    load_dino(d)
  msg = str(e.value)
  assert msg.startswith(f"{d / 'model.safetensors'}: weights do not match the DINO config")
  assert "missing key encoder.layer.2.attention.attention.key.bias" in msg
  assert (
    "wrong shape encoder.layer.0.intermediate.dense.weight: expected (96, 64), got (128, 64)" in msg
  )
  assert "unknown key classifier.weight" in msg


def test_config_weights_mismatch(hf_vit, tmp_path):
  def more_layers(cfg):
    cfg["num_hidden_layers"] = 4  # The weights have 3.

  d = edited_copy(hf_vit[0], tmp_path / "m", config_edit=more_layers)
  with pytest.raises(ValueError) as e:
    load_dino(d)
  missing = [line for line in str(e.value).splitlines() if "missing key" in line]
  assert len(missing) == 16  # Every parameter of the absent block is listed.
  assert all("encoder.layer.3." in line for line in missing)


@pytest.mark.parametrize(
  "edit, match",
  [
    (dict(hidden_act="gelu_new"), r"hidden_act='gelu_new' \(only 'gelu'"),
    (dict(hidden_act="relu", num_channels=4), r"hidden_act='relu'.*; num_channels=4"),
    (dict(num_attention_heads=5), r"hidden_size=64 is not a multiple of num_attention_heads=5"),
    (dict(image_size=36), r"image_size=36 is not a multiple of patch_size=8"),
  ],
)
def test_unsupported_config(hf_vit, tmp_path, edit, match):
  d = edited_copy(hf_vit[0], tmp_path / "c", config_edit=lambda c: c.update(edit))
  with pytest.raises(ValueError, match=f"config.json: unsupported DINO/ViT config: {match}"):
    load_dino(d)


def test_missing_files(hf_vit, tmp_path):
  (tmp_path / "d").mkdir()
  shutil.copy(hf_vit[0] / "model.safetensors", tmp_path / "d")
  with pytest.raises(FileNotFoundError, match=r"expected config.json plus model.safetensors; "):
    load_dino(tmp_path / "d")
  with pytest.raises(FileNotFoundError, match=r"model.safetensors needs a config.json beside it"):
    load_dino(tmp_path / "d" / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="DINO weights not found"):
    load_dino(tmp_path / "missing")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match=r"junk.pth: not a valid DINO weights file \(neither a zip"):
    load_dino(tmp_path / "junk.pth", cache_dir=tmp_path)


def test_clip_npz_is_not_a_dino_cache(tmp_path):
  from ssr_jax import demo

  with pytest.raises(ValueError, match="not an ssr_jax DINO cache"):
    load_dino(demo.SHIPPED_CLIP)


def test_normalize_and_bfloat16_close_to_float32(hf_vit):
  d, tm = hf_vit
  rgb = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  images = np.asarray(normalize(rgb))
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(images, (rgb - mean) / std, rtol=1e-6, atol=1e-6)
  model, params = load_dino(d, dtype=jnp.bfloat16)
  assert params["blocks_0"]["attn"]["qkv"]["kernel"].dtype == jnp.bfloat16
  assert params["pos_embed"].dtype == params["norm"]["scale"].dtype == jnp.float32
  attn = model.apply({"params": params}, images, method=DINO.attention_maps)
  want, _ = _theirs(tm, images)
  assert attn.dtype == jnp.float32
  # bf16 keeps 8 mantissa bits (~0.4% per rounding); three layers stay within a few percent.
  assert np.abs(np.asarray(attn) - want).max() / np.abs(want).max() < 3e-2


def test_jit_and_grid(hf_vit):
  model, params = load_dino(hf_vit[0])
  images = jnp.ones((1, 40, 24, 3))
  f = jax.jit(lambda p, x: model.apply({"params": p}, x, method=DINO.features))(params, images)
  assert f["grid"] == (5, 3) and f["attn"].shape == (3, 1, 4, 16, 16)


def test_no_qkv_bias_and_default_eps(tmp_path):
  """qkv_bias=False and an absent layer_norm_eps (transformers' 1e-12) are read from config.json;
  a .pth without qkv biases converts to the same tree."""
  transformers = pytest.importorskip("transformers")
  from dino_oracle import perturb_, tiny_vit_config

  torch.manual_seed(2)
  tm = transformers.ViTModel._from_config(
    tiny_vit_config(qkv_bias=False, layer_norm_eps=1e-12, patch_size=16),
    add_pooling_layer=False,
    attn_implementation="eager",
  )
  perturb_(tm, seed=2)
  tm.eval()
  tm.save_pretrained(tmp_path / "hf", safe_serialization=True)
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  cfg.pop("layer_norm_eps", None)
  (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
  model, params = load_dino(tmp_path / "hf")
  assert not model.cfg.qkv_bias and model.cfg.layer_norm_eps == 1e-12
  assert "bias" not in params["blocks_0"]["attn"]["qkv"]
  images = np.random.default_rng(4).standard_normal((1, 48, 32, 3)).astype(np.float32)
  want_attn, want_hidden = _theirs(tm, images)
  _assert_close(
    np.asarray(model.apply({"params": params}, images, method=DINO.attention_maps)), want_attn
  )
  _assert_close(np.asarray(model.apply({"params": params}, images)), want_hidden)
  torch.save(to_dino_state_dict(tm), tmp_path / "nobias.pth")
  model_pt, params_pt = load_dino(tmp_path / "nobias.pth", heads=4, cache_dir=tmp_path)
  assert not model_pt.cfg.qkv_bias
  _assert_same_params(params_pt, params)
