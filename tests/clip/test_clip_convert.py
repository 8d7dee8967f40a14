"""Weight loading: parity with transformers' PyTorch/Flax CLIP, OpenAI .pt, cache, errors."""

import hashlib
import os
import shutil

import jax
import numpy as np
import pytest
from clip_oracle import random_ids, tiny_hf_config
from flax import traverse_util

from ssr_jax.clip import CLIP, convert, load_clip, weights_fingerprint
from tests.hf_files import edited_copy

torch = pytest.importorskip("torch")

TOL = dict(rtol=1e-4, atol=1e-4)


def _ours(model, params, images, ids):
  feats = model.apply({"params": params}, images, method=CLIP.image_features)
  text = model.apply({"params": params}, ids, method=CLIP.encode_text)
  return jax.tree.map(np.asarray, feats), np.asarray(text)


def _theirs(tm, images, ids, interpolate=False):
  with torch.no_grad():
    px = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    out = tm.vision_model(
      pixel_values=px,
      output_hidden_states=True,
      output_attentions=True,
      interpolate_pos_encoding=interpolate,
    )
    pooled = tm.visual_projection(out.pooler_output).numpy()
    hidden = np.stack([h.numpy() for h in out.hidden_states[1:]])  # [0] is the ln_pre output.
    attn = np.stack([a.mean(1).numpy() for a in out.attentions])  # Mean over heads.
    # text_model + projection rather than get_text_features, whose return type changed in
    # transformers 5 (an output object instead of the tensor).
    tout = tm.text_model(input_ids=torch.from_numpy(ids).long())
    text = tm.text_projection(tout.pooler_output).numpy()
  return pooled, hidden, attn, text


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_parity_with_transformers(hf_tiny, tmp_path, size):
  d, tm = hf_tiny
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, *size, 3)).astype(np.float32)
  ids = random_ids(rng, 3)
  interpolate = size != (32, 32)
  # transformers' interpolate_pos_encoding is F.interpolate(bicubic, align_corners=False); our
  # resize builds the same Keys (a=-0.75) half-pixel matrices, so only float32 rounding differs
  # and the native-resolution tolerance still holds.
  model, params = load_clip(d, pos_interp="bicubic", cache_dir=tmp_path)
  feats, text = _ours(model, params, images, ids)
  pooled, hidden, attn, ttext = _theirs(tm, images, ids, interpolate)
  assert feats["grid"] == (size[0] // 8, size[1] // 8)
  np.testing.assert_allclose(feats["pooled"], pooled, **TOL)
  np.testing.assert_allclose(feats["hidden"], hidden, **TOL)
  np.testing.assert_allclose(feats["attn"], attn, **TOL)
  np.testing.assert_allclose(text, ttext, **TOL)
  assert np.isclose(float(params["logit_scale"]), float(tm.logit_scale.detach()))


def _to_openai(tm) -> dict:
  """transformers state dict -> OpenAI key names/layouts (inverse of HF's conversion script)."""
  sd = {k: v.detach().clone() for k, v in tm.state_dict().items() if "position_ids" not in k}
  out = {"logit_scale": sd.pop("logit_scale")}
  out["visual.proj"] = sd.pop("visual_projection.weight").T.contiguous()
  out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
  ren = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
  }
  for a, b in ren.items():
    out[b] = sd.pop(a)
  for p in ("weight", "bias"):
    out[f"visual.ln_pre.{p}"] = sd.pop(f"vision_model.pre_layrnorm.{p}")
    out[f"visual.ln_post.{p}"] = sd.pop(f"vision_model.post_layernorm.{p}")
    out[f"ln_final.{p}"] = sd.pop(f"text_model.final_layer_norm.{p}")
  for tower, dst in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
    i = 0
    while f"{tower}.encoder.layers.{i}.mlp.fc1.weight" in sd:
      s, o = f"{tower}.encoder.layers.{i}.", f"{dst}.resblocks.{i}."
      for p in ("weight", "bias"):
        qkv = [sd.pop(f"{s}self_attn.{n}_proj.{p}") for n in "qkv"]
        out[f"{o}attn.in_proj_{p}"] = torch.cat(qkv, 0)
        out[f"{o}attn.out_proj.{p}"] = sd.pop(f"{s}self_attn.out_proj.{p}")
        out[f"{o}ln_1.{p}"] = sd.pop(f"{s}layer_norm1.{p}")
        out[f"{o}ln_2.{p}"] = sd.pop(f"{s}layer_norm2.{p}")
        out[f"{o}mlp.c_fc.{p}"] = sd.pop(f"{s}mlp.fc1.{p}")
        out[f"{o}mlp.c_proj.{p}"] = sd.pop(f"{s}mlp.fc2.{p}")
      i += 1
  assert not sd, sorted(sd)
  return out


def _torchscript_archive(sd, path):
  """Saves sd as a TorchScript module with OpenAI's layout, including its integer buffers."""

  class Node(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return x

  root = Node()
  for k, v in sd.items():
    *mods, leaf = k.split(".")
    m = root
    for name in mods:
      if not hasattr(m, name):
        m.add_module(name, Node())
      m = getattr(m, name)
    m.register_parameter(leaf, torch.nn.Parameter(v, requires_grad=False))
  for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 100)):
    root.register_buffer(name, torch.tensor(value))
  torch.jit.script(root).save(str(path))


def test_openai_checkpoints_match_hf_path(hf_tiny, tmp_path):
  d, tm = hf_tiny
  model, ref = load_clip(d, cache_dir=tmp_path / "c0")
  ref = _flat(ref)
  sd = _to_openai(tm)

  torch.save(sd, tmp_path / "plain.pt")
  model_pt, params = load_clip(tmp_path / "plain.pt")
  assert model_pt.cfg == model.cfg  # Derived from shapes only (heads = width // 64).
  got = _flat(params)
  assert got.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)

  # The in-memory route (used by the benchmark) gives the same tree.
  mem = _flat(
    convert.params_from_state_dict(
      {k: v.numpy() for k, v in sd.items()}, model.cfg, layout="openai"
    )
  )
  for k in ref:
    np.testing.assert_array_equal(mem[k], ref[k], err_msg=k)

  # OpenAI's released files: TorchScript archives holding float16 weights.
  half = {k: v.half() for k, v in sd.items()}
  _torchscript_archive(half, tmp_path / "jit.pt")
  _, params = load_clip(tmp_path / "jit.pt")
  got = _flat(params)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k].astype(np.float16).astype(np.float32), err_msg=k)


def test_flax_msgpack(tmp_path):
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxCLIPModel"):
    pytest.skip("transformers >= 5 has no Flax models (requirements-test.txt pins 4.57.6)")
  fm = transformers.FlaxCLIPModel(tiny_hf_config(), seed=0)
  leaves, tree = jax.tree.flatten(fm.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  fm.params = jax.tree.unflatten(
    tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
  )
  fm.save_pretrained(tmp_path / "flax")
  assert sorted(os.listdir(tmp_path / "flax")) == ["config.json", "flax_model.msgpack"]
  model, params = load_clip(tmp_path / "flax")
  rng = np.random.default_rng(1)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids = random_ids(rng, 3)
  feats, text = _ours(model, params, images, ids)
  want_img = fm.get_image_features(pixel_values=images.transpose(0, 3, 1, 2))
  want_txt = fm.get_text_features(input_ids=ids)
  np.testing.assert_allclose(feats["pooled"], np.asarray(want_img), **TOL)
  np.testing.assert_allclose(text, np.asarray(want_txt), **TOL)


def test_cache_roundtrip_and_invalidation(hf_tiny, tmp_path, monkeypatch):
  src = tmp_path / "src"
  shutil.copytree(hf_tiny[0], src)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  _, first = load_clip(src)  # Default cache: the user cache dir, never beside the weights.
  (cache,) = (tmp_path / "xdg" / "ssr_jax").iterdir()
  assert cache.name.startswith("src_model.safetensors-") and cache.suffix == ".npz"
  assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in hf_tiny[0].iterdir())

  calls = []
  real = convert._convert
  monkeypatch.setattr(convert, "_convert", lambda s: calls.append(s) or real(s))
  _, second = load_clip(src)
  assert calls == []  # Served from the cache.
  _, direct = load_clip(cache)  # The .npz itself is a valid source.
  for other in (second, direct):
    a, b = _flat(first), _flat(other)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])

  sha = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
  assert weights_fingerprint(src) == weights_fingerprint(cache) == sha

  st = (src / "model.safetensors").stat()
  os.utime(src / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  load_clip(src)
  assert len(calls) == 1  # Source changed: converted again.
  load_clip(src)
  assert len(calls) == 1


def test_save_converted(tmp_path):
  from ssr_jax import testing
  from ssr_jax.clip import CLIPConfig, init_params

  cfg = testing.tiny_clip_config()
  params = init_params(CLIP(cfg), jax.random.key(3))
  path = convert.save_converted(tmp_path / "tiny.npz", cfg, params, meta={"steps": 7})
  model, loaded = load_clip(path)
  assert model.cfg == cfg
  a, b = _flat(params), _flat(loaded)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert convert.load_converted(path)[2]["extra"] == {"steps": 7}
  fp = weights_fingerprint(path)
  assert len(fp) == 64 and fp == weights_fingerprint(
    convert.save_converted(tmp_path / "b.npz", cfg, params)
  )
  with pytest.raises(ValueError, match="differs from the CLIP model"):
    convert.save_converted(tmp_path / "bad.npz", CLIPConfig(), params)


def test_dir_without_weights(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"config.json plus model.safetensors"):
    load_clip(tmp_path)
  with pytest.raises(FileNotFoundError, match="not found"):
    load_clip(tmp_path / "missing")


def test_config_weights_mismatch(hf_tiny, tmp_path):
  def more_layers(cfg):
    cfg["vision_config"]["num_hidden_layers"] = 4  # The weights have 3.

  d = edited_copy(hf_tiny[0], tmp_path / "m", config_edit=more_layers)
  with pytest.raises(ValueError) as e:
    load_clip(d)
  msg = str(e.value)
  assert str(d / "model.safetensors") in msg
  missing = [line for line in msg.splitlines() if "missing key" in line]
  assert len(missing) == 16  # Every parameter of the absent block is listed.
  assert all("vision_model.encoder.layers.3." in line for line in missing)


def test_unknown_and_misshaped_keys(hf_tiny, tmp_path):
  def edit(sd):
    sd["vision_model.extra.weight"] = np.zeros(3, np.float32)
    sd["text_projection.weight"] = np.zeros((31, 128), np.float32)

  d = edited_copy(hf_tiny[0], tmp_path / "u", weights_edit=edit)
  with pytest.raises(ValueError) as e:
    load_clip(d)
  msg = str(e.value)
  assert "unknown key vision_model.extra.weight" in msg
  assert "wrong shape text_projection.weight: expected (32, 128), got (31, 128)" in msg


def test_unsupported_activation(hf_tiny, tmp_path):
  def gelu(cfg):
    cfg["text_config"]["hidden_act"] = "gelu"

  d = edited_copy(hf_tiny[0], tmp_path / "g", config_edit=gelu)
  with pytest.raises(ValueError, match=r"text_config.hidden_act='gelu'"):
    load_clip(d)


def test_bfloat16_compute_close_to_float32(hf_tiny, tmp_path):
  d, tm = hf_tiny
  rng = np.random.default_rng(2)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids = random_ids(rng, 3)
  model, params = load_clip(d, dtype=jax.numpy.bfloat16, cache_dir=tmp_path)
  assert params["visual"]["proj"].dtype == np.float32  # Projections and norms stay float32...
  assert params["visual"]["ln_post"]["scale"].dtype == np.float32
  block = params["visual"]["transformer"]["resblocks_0"]
  assert block["attn"]["in_proj"]["kernel"].dtype == jax.numpy.bfloat16  # ...matmul weights not.
  feats, text = _ours(model, params, images, ids)
  pooled, _, attn, ttext = _theirs(tm, images, ids)
  rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()
  # bf16 keeps 8 mantissa bits (~0.4% per rounding); a few layers stay within a few percent.
  assert rel(feats["pooled"].astype(np.float32), pooled) < 3e-2
  assert rel(feats["attn"], attn) < 3e-2
  assert rel(text.astype(np.float32), ttext) < 3e-2


def test_mlp_width_not_4x(tmp_path):
  """MLP widths other than 4 x width (as OpenCLIP's ViT-bigG/14) from config.json and from an
  OpenAI-layout .pt (c_fc's shape), matching transformers."""
  transformers = pytest.importorskip("transformers")
  from clip_oracle import perturb_

  torch.manual_seed(1)
  tm = transformers.CLIPModel._from_config(
    tiny_hf_config(vision_mlp=320, text_mlp=192), attn_implementation="eager"
  )
  perturb_(tm, seed=1)
  tm.eval()
  tm.save_pretrained(tmp_path / "hf", safe_serialization=True)
  model, params = load_clip(tmp_path / "hf", cache_dir=tmp_path / "c")
  assert (model.cfg.vision_mlp, model.cfg.text_mlp) == (320, 192)
  assert params["visual"]["transformer"]["resblocks_2"]["mlp"]["c_fc"]["kernel"].shape == (128, 320)
  rng = np.random.default_rng(3)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids = random_ids(rng, 3)
  feats, text = _ours(model, params, images, ids)
  pooled, hidden, attn, ttext = _theirs(tm, images, ids)
  np.testing.assert_allclose(feats["pooled"], pooled, **TOL)
  np.testing.assert_allclose(feats["hidden"], hidden, **TOL)
  np.testing.assert_allclose(feats["attn"], attn, **TOL)
  np.testing.assert_allclose(text, ttext, **TOL)

  torch.save(_to_openai(tm), tmp_path / "openai.pt")
  model_pt, params_pt = load_clip(tmp_path / "openai.pt")
  assert model_pt.cfg == model.cfg
  ref, got = _flat(params), _flat(params_pt)
  assert got.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_mlp_width_4x_is_the_default():
  from ssr_jax.clip import CLIPConfig

  # Explicit 4 x width equals the default, so configs read from files compare equal to CONFIGS.
  assert CLIPConfig(vision_mlp=3072, text_mlp=2048) == CLIPConfig()
  assert CLIPConfig(vision_mlp=3072).vision_mlp is None
  assert CLIPConfig(vision_mlp=1000).vision_mlp == 1000
