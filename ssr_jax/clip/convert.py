"""CLIP weights -> ssr_jax params, with a converted-once .npz cache.

Sources (`load_clip(path)`):
- a Hugging Face directory: config.json + model.safetensors (read with safetensors.numpy, no
  torch), or config.json + flax_model.msgpack (transformers 4.x FlaxCLIPModel.save_pretrained);
- an OpenAI checkpoint such as ViT-B-16.pt (TorchScript archive or a plain state dict; needs
  torch, imported only in that branch and loaded with weights_only=True);
- a converted .npz written by this module.

Conversion is key renaming plus transposes (model.py names its submodules after OpenAI's keys):
torch Linear [out, in] -> kernel [in, out]; conv [W, 3, p, p] -> [p, p, 3, W]; HF's separate
q/k/v projections are concatenated into in_proj. Every key is checked against the config: unknown,
missing or mis-shaped keys raise one ValueError listing all of them.

The converted arrays are cached as .npz (flat "visual/transformer/..." keys plus a JSON
`__meta__` entry holding the CLIPConfig, the source files' size/mtime and the sha256 of the
weights file), in `cache_dir` (default: $XDG_CACHE_HOME/ssr_jax or ~/.cache/ssr_jax, never
beside the weights). A cache whose source changed is rebuilt.
"""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from etils.epath import Path
from flax import traverse_util

from ssr_jax import weights_npz
from ssr_jax.clip.model import CLIP, CLIPConfig, cast_for_compute

_CACHE_VERSION = 1  # Bump when the converted layout changes; older caches are then rebuilt.
_META_KEY = weights_npz.META_KEY
_HF_WEIGHTS = ("model.safetensors", "flax_model.msgpack")
_HF_IGNORED = {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
# OpenAI's TorchScript archives carry these integer buffers next to the weights.
_OPENAI_IGNORED = {"input_resolution", "context_length", "vocab_size"}
ACCEPTED = (
  "a Hugging Face CLIP directory (config.json + model.safetensors or flax_model.msgpack), an "
  "OpenAI ViT .pt checkpoint (e.g. ViT-B-16.pt), or an .npz converted by ssr_jax"
)


# ---------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Source:
  kind: str  # "hf_safetensors", "hf_flax", "openai" or "npz".
  weights: Path
  config: Path | None = None

  @property
  def files(self) -> tuple[Path, ...]:
    return (self.weights,) if self.config is None else (self.weights, self.config)


def _resolve(path) -> _Source:
  p = Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(
      f"CLIP weights not found: {p}. Give a Hugging Face directory (config.json + "
      "model.safetensors or flax_model.msgpack), an OpenAI .pt file, or a converted .npz."
    )
  if p.is_dir():
    present = sorted(x.name for x in p.iterdir())
    weights = next((p / n for n in _HF_WEIGHTS if (p / n).is_file()), None)
    if weights is None or not (p / "config.json").is_file():
      raise FileNotFoundError(
        f"{p} holds no loadable CLIP weights: expected config.json plus model.safetensors "
        f"(or flax_model.msgpack); found {present or 'nothing'}. Download e.g. "
        "openai/clip-vit-base-patch16 with `hf download`, or pass an OpenAI ViT-B-16.pt file."
      )
    kind = "hf_safetensors" if weights.name.endswith(".safetensors") else "hf_flax"
    return _Source(kind, weights, p / "config.json")
  if p.suffix == ".npz":
    return _Source("npz", p)
  if p.suffix in (".safetensors", ".msgpack"):
    if not (p.parent / "config.json").is_file():
      raise FileNotFoundError(f"{p} needs a config.json beside it (Hugging Face layout)")
    kind = "hf_safetensors" if p.suffix == ".safetensors" else "hf_flax"
    return _Source(kind, p, p.parent / "config.json")
  return _Source("openai", p)


sha256_file = weights_npz.sha256_file  # Hex sha256 of a file's bytes (local or gs://).


def _stamp(files) -> list[dict]:
  return [weights_npz.stamp(f) for f in files]


def _cache_path(src: _Source, cache_dir) -> Path:
  # The parent's name tells a cache dir's files apart (HF weights are all model.safetensors).
  return weights_npz.cache_path(src.weights, cache_dir, prefix=f"{src.weights.parent.name}_")


# ---------------------------------------------------------------- configs


def _config_from_hf(config_path: Path) -> CLIPConfig:
  """CLIPConfig from a transformers CLIPConfig json (absent keys take transformers' defaults)."""
  try:
    raw = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: not valid JSON ({e})") from e
  # Old configs keep overrides in *_config_dict; transformers lets those win.
  tc = {**(raw.get("text_config") or {}), **(raw.get("text_config_dict") or {})}
  vc = {**(raw.get("vision_config") or {}), **(raw.get("vision_config_dict") or {})}
  problems = []
  for name, c in (("text_config", tc), ("vision_config", vc)):
    if c.get("hidden_act", "quick_gelu") != "quick_gelu":
      problems.append(f"{name}.hidden_act={c['hidden_act']!r} (only quick_gelu is implemented)")
    if not math.isclose(c.get("layer_norm_eps", 1e-5), 1e-5):
      problems.append(f"{name}.layer_norm_eps={c['layer_norm_eps']} (must be 1e-5)")
  if vc.get("num_channels", 3) != 3:
    problems.append(f"vision_config.num_channels={vc['num_channels']} (must be 3)")
  if problems:
    raise ValueError(f"{config_path}: unsupported CLIP config: " + "; ".join(problems))
  return CLIPConfig(
    embed_dim=raw.get("projection_dim", 512),
    image_size=vc.get("image_size", 224),
    patch_size=vc.get("patch_size", 32),
    vision_width=vc.get("hidden_size", 768),
    vision_layers=vc.get("num_hidden_layers", 12),
    vision_heads=vc.get("num_attention_heads", 12),
    context_length=tc.get("max_position_embeddings", 77),
    vocab_size=tc.get("vocab_size", 49408),
    text_width=tc.get("hidden_size", 512),
    text_layers=tc.get("num_hidden_layers", 12),
    text_heads=tc.get("num_attention_heads", 8),
    # Any MLP width (OpenCLIP's ViT-bigG/14 has 8192 for width 1664); defaults as transformers'.
    vision_mlp=vc.get("intermediate_size", 3072),
    text_mlp=tc.get("intermediate_size", 2048),
  )


def _config_from_openai(sd: dict, path: Path) -> CLIPConfig:
  """CLIPConfig from OpenAI state-dict shapes, as openai/clip's build_model derives it."""
  needed = [
    "visual.conv1.weight",
    "visual.positional_embedding",
    "text_projection",
    "positional_embedding",
    "token_embedding.weight",
    "ln_final.weight",
  ]
  if "visual.proj" not in sd and "visual.attnpool.c_proj.weight" in sd:
    raise ValueError(f"{path}: ResNet CLIP checkpoints are not supported; use a ViT one")
  missing = [k for k in needed + ["visual.proj"] if k not in sd]
  if missing:
    raise ValueError(f"{path}: not an OpenAI ViT CLIP state dict; missing keys {missing}")
  vw, _, _, patch = sd["visual.conv1.weight"].shape
  grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
  tw = sd["ln_final.weight"].shape[0]
  v_layers = {
    m.group(1) for k in sd if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))
  }
  t_layers = {m.group(1) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}

  def mlp(prefix, w):  # First block's c_fc rows (absent: 4 x w; _apply_spec lists the gap).
    fc = sd.get(f"{prefix}resblocks.0.mlp.c_fc.weight")
    return 4 * w if fc is None else fc.shape[0]

  return CLIPConfig(
    embed_dim=sd["text_projection"].shape[1],
    image_size=patch * grid,
    patch_size=patch,
    vision_width=vw,
    vision_layers=len(v_layers),
    vision_heads=max(1, vw // 64),  # OpenAI's head width is always 64.
    context_length=sd["positional_embedding"].shape[0],
    vocab_size=sd["token_embedding.weight"].shape[0],
    text_width=tw,
    text_layers=len(t_layers),
    text_heads=max(1, tw // 64),
    vision_mlp=mlp("visual.transformer.", vw),
    text_mlp=mlp("transformer.", tw),
  )


# ---------------------------------------------------------------- key maps

# Each spec maps a source key to (our flat key, expected source shape, transform).
_T = lambda a: a.T  # torch Linear [out, in] -> Dense kernel [in, out].
_CONV = lambda a: a.transpose(2, 3, 1, 0)  # torch conv [W, 3, p, p] -> flax [p, p, 3, W].
_ID = lambda a: a


def _block_spec(src, dst, w, hf, mlp=None):
  """Spec of one residual block (MLP hidden width mlp, None: 4 x w); HF's q/k/v entries carry
  slot index 0/1/2 of in_proj."""
  m = mlp or 4 * w
  s = {}
  if hf:
    for i, n in enumerate("qkv"):
      s[f"{src}.self_attn.{n}_proj.weight"] = (f"{dst}/attn/in_proj/kernel", (w, w), ("qkv", i))
      s[f"{src}.self_attn.{n}_proj.bias"] = (f"{dst}/attn/in_proj/bias", (w,), ("qkv", i))
    names = dict(
      out="self_attn.out_proj",
      ln_1="layer_norm1",
      ln_2="layer_norm2",
      c_fc="mlp.fc1",
      c_proj="mlp.fc2",
    )
  else:
    s[f"{src}.attn.in_proj_weight"] = (f"{dst}/attn/in_proj/kernel", (3 * w, w), _T)
    s[f"{src}.attn.in_proj_bias"] = (f"{dst}/attn/in_proj/bias", (3 * w,), _ID)
    names = dict(
      out="attn.out_proj", ln_1="ln_1", ln_2="ln_2", c_fc="mlp.c_fc", c_proj="mlp.c_proj"
    )
  s[f"{src}.{names['out']}.weight"] = (f"{dst}/attn/out_proj/kernel", (w, w), _T)
  s[f"{src}.{names['out']}.bias"] = (f"{dst}/attn/out_proj/bias", (w,), _ID)
  for ln in ("ln_1", "ln_2"):
    s[f"{src}.{names[ln]}.weight"] = (f"{dst}/{ln}/scale", (w,), _ID)
    s[f"{src}.{names[ln]}.bias"] = (f"{dst}/{ln}/bias", (w,), _ID)
  s[f"{src}.{names['c_fc']}.weight"] = (f"{dst}/mlp/c_fc/kernel", (m, w), _T)
  s[f"{src}.{names['c_fc']}.bias"] = (f"{dst}/mlp/c_fc/bias", (m,), _ID)
  s[f"{src}.{names['c_proj']}.weight"] = (f"{dst}/mlp/c_proj/kernel", (w, m), _T)
  s[f"{src}.{names['c_proj']}.bias"] = (f"{dst}/mlp/c_proj/bias", (w,), _ID)
  return s


def _ln_spec(src, dst, w):
  return {f"{src}.weight": (f"{dst}/scale", (w,), _ID), f"{src}.bias": (f"{dst}/bias", (w,), _ID)}


def _hf_spec(c: CLIPConfig) -> dict:
  W, Wt, D, p = c.vision_width, c.text_width, c.embed_dim, c.patch_size
  v, t = "vision_model", "text_model"
  s = {
    f"{v}.embeddings.class_embedding": ("visual/class_embedding", (W,), _ID),
    f"{v}.embeddings.patch_embedding.weight": ("visual/conv1/kernel", (W, 3, p, p), _CONV),
    f"{v}.embeddings.position_embedding.weight": (
      "visual/positional_embedding",
      (c.grid**2 + 1, W),
      _ID,
    ),
    **_ln_spec(f"{v}.pre_layrnorm", "visual/ln_pre", W),
    **_ln_spec(f"{v}.post_layernorm", "visual/ln_post", W),
    "visual_projection.weight": ("visual/proj", (D, W), _T),
    f"{t}.embeddings.token_embedding.weight": (
      "text/token_embedding/embedding",
      (c.vocab_size, Wt),
      _ID,
    ),
    f"{t}.embeddings.position_embedding.weight": (
      "text/positional_embedding",
      (c.context_length, Wt),
      _ID,
    ),
    **_ln_spec(f"{t}.final_layer_norm", "text/ln_final", Wt),
    "text_projection.weight": ("text/text_projection", (D, Wt), _T),
    "logit_scale": ("logit_scale", (), _ID),
  }
  for i in range(c.vision_layers):
    s |= _block_spec(
      f"{v}.encoder.layers.{i}", f"visual/transformer/resblocks_{i}", W, hf=True, mlp=c.vision_mlp
    )
  for i in range(c.text_layers):
    s |= _block_spec(
      f"{t}.encoder.layers.{i}", f"text/transformer/resblocks_{i}", Wt, hf=True, mlp=c.text_mlp
    )
  return s


def _openai_spec(c: CLIPConfig) -> dict:
  W, Wt, D, p = c.vision_width, c.text_width, c.embed_dim, c.patch_size
  s = {
    "visual.class_embedding": ("visual/class_embedding", (W,), _ID),
    "visual.conv1.weight": ("visual/conv1/kernel", (W, 3, p, p), _CONV),
    "visual.positional_embedding": ("visual/positional_embedding", (c.grid**2 + 1, W), _ID),
    **_ln_spec("visual.ln_pre", "visual/ln_pre", W),
    **_ln_spec("visual.ln_post", "visual/ln_post", W),
    "visual.proj": ("visual/proj", (W, D), _ID),  # Already [W, D].
    "token_embedding.weight": ("text/token_embedding/embedding", (c.vocab_size, Wt), _ID),
    "positional_embedding": ("text/positional_embedding", (c.context_length, Wt), _ID),
    **_ln_spec("ln_final", "text/ln_final", Wt),
    "text_projection": ("text/text_projection", (Wt, D), _ID),
    "logit_scale": ("logit_scale", (), _ID),
  }
  for i in range(c.vision_layers):
    s |= _block_spec(
      f"visual.transformer.resblocks.{i}",
      f"visual/transformer/resblocks_{i}",
      W,
      hf=False,
      mlp=c.vision_mlp,
    )
  for i in range(c.text_layers):
    s |= _block_spec(
      f"transformer.resblocks.{i}", f"text/transformer/resblocks_{i}", Wt, hf=False, mlp=c.text_mlp
    )
  return s


def _apply_spec(sd: dict, spec: dict, ignored: set, path: Path) -> dict[str, np.ndarray]:
  """Validates sd against spec (all problems in one error) and returns our flat float32 dict."""
  weights_npz.check_against_spec(sd, spec, path, what="CLIP", ignored=ignored)
  out, qkv = {}, {}
  for k, (dst, _, fn) in spec.items():
    a = np.asarray(sd[k], np.float32)
    if isinstance(fn, tuple):  # HF q/k/v slot of the fused in_proj.
      qkv.setdefault(dst, [None] * 3)[fn[1]] = a.T if a.ndim == 2 else a
    else:
      out[dst] = np.array(fn(a), order="C")  # ascontiguousarray would make 0-d arrays 1-d.
  for dst, parts in qkv.items():
    out[dst] = np.concatenate(parts, axis=-1)
  return out


def _check_against_model(flat: dict, cfg: CLIPConfig, path: Path):
  """Guards the key maps themselves: the result must be exactly the Flax model's tree."""
  c = cfg
  images = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, c.context_length), jnp.int32)
  shapes = jax.eval_shape(CLIP(c).init, jax.random.key(0), images, ids)["params"]
  want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))
    raise ValueError(f"{path}: converted tree differs from the CLIP model: {diff}")


# ---------------------------------------------------------------- readers


def _read_hf_flax(path: Path) -> dict[str, np.ndarray]:
  """flax_model.msgpack -> HF PyTorch-style flat dict (Dense kernels back to [out, in])."""
  from flax import serialization

  tree = serialization.msgpack_restore(path.read_bytes())
  if set(tree) == {"params"}:
    tree = tree["params"]
  sd = {}
  for keys, a in traverse_util.flatten_dict(tree).items():
    a = np.asarray(a)
    name, leaf = ".".join(keys[:-1]), keys[-1]
    if leaf == "kernel":
      a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
      leaf = "weight"
    elif leaf in ("embedding", "scale"):
      leaf = "weight"
    sd[f"{name}.{leaf}" if name else leaf] = a
  return sd


def _read_openai(path: Path) -> dict[str, np.ndarray]:
  weights_npz.check_torch_file(path, what="CLIP", accepted=ACCEPTED)
  torch = weights_npz.import_torch(path, what="an OpenAI .pt checkpoint")
  try:  # OpenAI's released files are TorchScript archives; open_clip-style ones plain pickles.
    sd = torch.jit.load(weights_npz.torch_source(path), map_location="cpu").state_dict()
  except RuntimeError:
    try:
      sd = torch.load(weights_npz.torch_source(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and torch errors alike.
      cause = f"neither a TorchScript archive nor a torch state dict: {type(e).__name__}"
      raise weights_npz.invalid(path, "CLIP", ACCEPTED, cause) from e
  if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    cause = f"expected a state dict, got {type(sd).__name__}"
    raise weights_npz.invalid(path, "CLIP", ACCEPTED, cause)
  return {k: v.detach().float().numpy() for k, v in sd.items()}


def _convert(src: _Source) -> tuple[CLIPConfig, dict[str, np.ndarray]]:
  if src.kind == "openai":
    sd = _read_openai(src.weights)
    cfg = _config_from_openai(sd, src.weights)
    flat = _apply_spec(sd, _openai_spec(cfg), _OPENAI_IGNORED, src.weights)
  else:
    cfg = _config_from_hf(src.config)
    read = weights_npz.read_safetensors if src.kind == "hf_safetensors" else _read_hf_flax
    try:
      sd = read(src.weights)
    except Exception as e:  # noqa: BLE001 - safetensors and msgpack raise their own types.
      raise weights_npz.invalid(src.weights, "CLIP", ACCEPTED, e) from e
    flat = _apply_spec(sd, _hf_spec(cfg), _HF_IGNORED, src.weights)
  _check_against_model(flat, cfg, src.weights)
  return cfg, flat


# ---------------------------------------------------------------- cache


def _read_npz(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
  meta, flat = weights_npz.read(path, version=_CACHE_VERSION, what="CLIP", accepted=ACCEPTED)
  if "kind" in meta:  # CLIP's files carry no kind; DINO's say "dino_v1".
    raise weights_npz.invalid(path, "CLIP", ACCEPTED, f"an ssr_jax {meta['kind']} file")
  return meta, flat


def read_metadata(path) -> dict:
  """The JSON metadata of a converted .npz (config, sha256, "extra"), without reading its arrays
  ({} for an .npz that is not an ssr_jax CLIP cache)."""
  return weights_npz.read_metadata(path)


def _valid_cache(src: _Source, cache: Path) -> bool:
  return weights_npz.valid_cache(cache, version=_CACHE_VERSION, sources=_stamp(src.files))


def load_converted(path, *, cache_dir=None) -> tuple[CLIPConfig, dict[str, np.ndarray], dict]:
  """(config, flat float32 arrays keyed "visual/conv1/kernel"..., metadata) from any source.

  Converts on first use and caches; metadata holds "config", "sha256", and "sources" (for a
  conversion) or "extra" (for save_converted files).
  """
  src = _resolve(path)
  if src.kind == "npz":
    meta, flat = _read_npz(src.weights)
    return CLIPConfig(**meta["config"]), flat, meta
  cache = _cache_path(src, cache_dir)
  if _valid_cache(src, cache):
    meta, flat = _read_npz(cache)
    return CLIPConfig(**meta["config"]), flat, meta
  cfg, flat = _convert(src)
  meta = dict(
    version=_CACHE_VERSION,
    config=dataclasses.asdict(cfg),
    sources=_stamp(src.files),
    sha256=sha256_file(src.weights),
    source_path=weights_npz.absolute(src.weights),
  )
  weights_npz.write_cache(cache, meta, flat, what="CLIP")
  return cfg, flat, meta


# ---------------------------------------------------------------- public


def load_clip(path, *, dtype=jnp.float32, pos_interp="bilinear", cache_dir=None):
  """Loads CLIP weights -> (CLIP model, params). dtype is the compute dtype; Dense/Conv kernels
  and biases are stored in it (`cast_for_compute`), all other params are float32.

  path: HF directory, OpenAI .pt, or converted .npz (see the module docstring). pos_interp:
  position-embedding resize for other resolutions ("bilinear" as WeCLIP, or "bicubic" as
  transformers' interpolate_pos_encoding). cache_dir: where the converted .npz goes (default:
  weights_npz.user_cache_dir()).
  """
  cfg, flat, _ = load_converted(path, cache_dir=cache_dir)
  return CLIP(cfg, dtype=dtype, pos_interp=pos_interp), cast_for_compute(_unflatten(flat), dtype)


def save_converted(
  path, cfg: CLIPConfig, params, *, meta: dict | None = None, compress: bool = False
) -> Path:
  """Writes params (e.g. a CLIP trained in-process) as a converted .npz that load_clip reads.

  Its fingerprint is the sha256 of the parameter arrays; meta (JSON-serialisable) is stored
  under "extra" in the file's metadata (see load_converted). compress: zip-deflate the arrays
  (for files that ship with the package).
  """
  return weights_npz.save_params(
    path, cfg, params, _check_against_model, meta=meta, compress=compress, version=_CACHE_VERSION
  )


def params_from_state_dict(state_dict, cfg: CLIPConfig, *, layout: str = "hf"):
  """In-memory state dict (numpy arrays, transformers' CLIPModel or OpenAI key names) -> params.

  layout: "hf" or "openai". Same checks as load_clip; nothing is cached.
  """
  if layout not in ("hf", "openai"):
    raise ValueError(f"layout must be 'hf' or 'openai', got {layout!r}")
  spec, ignored = (_hf_spec, _HF_IGNORED) if layout == "hf" else (_openai_spec, _OPENAI_IGNORED)
  where = Path(f"<{layout} state dict>")
  flat = _apply_spec(state_dict, spec(cfg), ignored, where)
  _check_against_model(flat, cfg, where)
  return _unflatten(flat)


def _unflatten(flat: dict[str, np.ndarray]):
  return traverse_util.unflatten_dict(
    {tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()}
  )


def weights_fingerprint(path, *, cache_dir=None) -> str:
  """sha256 (hex) of the weights file (model.safetensors / flax_model.msgpack / the .pt).

  Read from the conversion cache when it is valid, so the hash is computed once; for a converted
  .npz it is the hash of the file it was converted from.
  """
  src = _resolve(path)
  if src.kind == "npz":
    meta = read_metadata(src.weights)
    return meta.get("sha256") or sha256_file(src.weights)
  cache = _cache_path(src, cache_dir)
  if _valid_cache(src, cache):
    return read_metadata(cache)["sha256"]
  return sha256_file(src.weights)
