"""DINO v1 ViT weights -> ssr_jax params.

Sources (`load_dino(path)`):
- a Hugging Face directory such as facebook/dino-vits16: config.json + model.safetensors, read
  with safetensors.numpy (no torch). Keys with or without the `vit.` prefix (ViTModel or a
  model wrapping one); the pooler, if present, is ignored;
- the official DINO checkpoint, e.g. dino_deitsmall16_pretrain.pth (timm/DeiT-style keys:
  cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
  mlp.fc2}, norm), or a DINO training checkpoint (its teacher backbone). Needs torch, imported
  only in that branch and read with torch.load(weights_only=True). The architecture comes from
  the tensor shapes; the head count from the width (384 -> 6, 768 -> 12) or the `heads`
  argument. Converted once to an .npz cache (in `cache_dir`, default the user cache directory
  $XDG_CACHE_HOME/ssr_jax or ~/.cache/ssr_jax) that later calls
  read without torch; a cache whose source changed (size or mtime) is rebuilt;
- a converted .npz written by this module.

Every key is checked: unknown, missing or mis-shaped keys raise one ValueError that names the
file and lists all of them.
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
from ssr_jax.clip.convert import sha256_file
from ssr_jax.clip.model import cast_for_compute
from ssr_jax.dino.model import DINO, DINOConfig

_CACHE_VERSION = 1  # Bump when the converted layout changes; older caches are then rebuilt.
_CACHE_KIND = "dino_v1"
_META_KEY = weights_npz.META_KEY
_HF_IGNORED_PREFIX = "pooler."  # ViTModel's tanh pooler: not part of the backbone.
_HEADS_BY_WIDTH = {384: 6, 768: 12}  # DINO's ViT-S and ViT-B (head width 64).
# The official DINO code's LayerNorm eps (vision_transformer.py: partial(nn.LayerNorm, eps=1e-6)).
_DINO_LN_EPS = 1e-6
ACCEPTED = (
  "a Hugging Face ViT directory (config.json + model.safetensors, e.g. facebook/dino-vits16), "
  "the official DINO .pth (e.g. dino_deitsmall16_pretrain.pth) or a DINO training checkpoint, "
  "or an .npz converted by ssr_jax"
)


# ---------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Source:
  kind: str  # "hf", "torch" or "npz".
  weights: Path
  config: Path | None = None


def _resolve(path) -> _Source:
  p = Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(
      f"DINO weights not found: {p}. Give a Hugging Face directory (config.json + "
      "model.safetensors, e.g. facebook/dino-vits16), the official dino_deitsmall16_pretrain.pth, "
      "or a converted .npz."
    )
  if p.is_dir():
    present = sorted(x.name for x in p.iterdir())
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
      raise FileNotFoundError(
        f"{p} holds no loadable DINO weights: expected config.json plus model.safetensors; "
        f"found {present or 'nothing'}"
      )
    return _Source("hf", p / "model.safetensors", p / "config.json")
  if p.suffix == ".safetensors":
    if not (p.parent / "config.json").is_file():
      raise FileNotFoundError(f"{p} needs a config.json beside it (Hugging Face layout)")
    return _Source("hf", p, p.parent / "config.json")
  if p.suffix == ".npz":
    return _Source("npz", p)
  return _Source("torch", p)


def _cache_path(src: _Source, cache_dir) -> Path:
  return weights_npz.cache_path(src.weights, cache_dir)


# ---------------------------------------------------------------- configs


def _config_from_hf(config_path: Path) -> DINOConfig:
  """DINOConfig from a transformers ViTConfig json (absent keys take transformers' defaults)."""
  try:
    raw = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: not valid JSON ({e})") from e
  width = raw.get("hidden_size", 768)
  heads = raw.get("num_attention_heads", 12)
  image_size, patch_size = raw.get("image_size", 224), raw.get("patch_size", 16)
  problems = []
  if raw.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act={raw['hidden_act']!r} (only 'gelu', the exact erf GELU)")
  if raw.get("num_channels", 3) != 3:
    problems.append(f"num_channels={raw['num_channels']} (must be 3: RGB images)")
  if width % heads:
    problems.append(f"hidden_size={width} is not a multiple of num_attention_heads={heads}")
  for name, v in (("image_size", image_size), ("patch_size", patch_size)):
    if not isinstance(v, int):  # transformers also accepts (h, w) pairs; DINO's are square.
      problems.append(f"{name}={v!r} (must be one integer)")
  if not problems and image_size % patch_size:
    problems.append(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
  if problems:
    raise ValueError(f"{config_path}: unsupported DINO/ViT config: " + "; ".join(problems))
  return DINOConfig(
    image_size=image_size,
    patch_size=patch_size,
    width=width,
    layers=raw.get("num_hidden_layers", 12),
    heads=heads,
    mlp=raw.get("intermediate_size", 3072),
    layer_norm_eps=raw.get("layer_norm_eps", 1e-12),  # transformers' ViTConfig default.
    qkv_bias=raw.get("qkv_bias", True),
  )


def _config_from_dino(sd: dict, path: Path, heads: int | None) -> DINOConfig:
  """DINOConfig from the official checkpoint's tensor shapes."""
  needed = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"]
  missing = [k for k in needed if k not in sd]
  if missing:
    raise ValueError(
      f"{path}: not a DINO ViT state dict (cls_token, pos_embed, patch_embed.proj, blocks.N...); "
      f"missing keys {missing}"
    )
  width, _, patch, _ = sd["patch_embed.proj.weight"].shape
  n = sd["pos_embed"].shape[1] - 1
  grid = math.isqrt(n)
  if grid * grid != n:
    raise ValueError(f"{path}: pos_embed holds {n} patch positions, not a square grid")
  if heads is None:
    if width not in _HEADS_BY_WIDTH:
      raise ValueError(
        f"{path}: no known head count for width {width} (known: {_HEADS_BY_WIDTH}); pass heads="
      )
    heads = _HEADS_BY_WIDTH[width]
  if width % heads:
    raise ValueError(f"{path}: width {width} is not a multiple of heads={heads}")
  layers = {m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
  return DINOConfig(
    image_size=patch * grid,
    patch_size=patch,
    width=width,
    layers=len(layers),
    heads=heads,
    mlp=sd["blocks.0.mlp.fc1.weight"].shape[0],
    layer_norm_eps=_DINO_LN_EPS,
    qkv_bias="blocks.0.attn.qkv.bias" in sd,
  )


# ---------------------------------------------------------------- key maps

# Each spec maps a source key to (our flat key, expected source shape, transform).
_T = lambda a: a.T  # torch Linear [out, in] -> Dense kernel [in, out].
_CONV = lambda a: a.transpose(2, 3, 1, 0)  # torch conv [D, 3, p, p] -> flax [p, p, 3, D].
_ID = lambda a: a


def _pair(src, dst, shape_out, shape_in=None):
  """Linear (shape_in given) or LayerNorm (not) weight + bias entries."""
  if shape_in is None:
    return {
      f"{src}.weight": (f"{dst}/scale", (shape_out,), _ID),
      f"{src}.bias": (f"{dst}/bias", (shape_out,), _ID),
    }
  return {
    f"{src}.weight": (f"{dst}/kernel", (shape_out, shape_in), _T),
    f"{src}.bias": (f"{dst}/bias", (shape_out,), _ID),
  }


def _common_spec(c: DINOConfig, names: dict) -> dict:
  D, p = c.width, c.patch_size
  return {
    names["cls"]: ("cls_token", (1, 1, D), _ID),
    names["pos"]: ("pos_embed", (1, c.grid**2 + 1, D), _ID),
    f"{names['patch']}.weight": ("patch_embed/kernel", (D, 3, p, p), _CONV),
    f"{names['patch']}.bias": ("patch_embed/bias", (D,), _ID),
    **_pair(names["norm"], "norm", D),
  }


def _hf_spec(c: DINOConfig) -> dict:
  """transformers ViTModel keys (without the `vit.` prefix)."""
  D = c.width
  names = dict(
    cls="embeddings.cls_token",
    pos="embeddings.position_embeddings",
    patch="embeddings.patch_embeddings.projection",
    norm="layernorm",
  )
  s = _common_spec(c, names)
  for i in range(c.layers):
    src, dst = f"encoder.layer.{i}", f"blocks_{i}"
    for j, n in enumerate(("query", "key", "value")):  # Slot j of the fused qkv.
      s[f"{src}.attention.attention.{n}.weight"] = (f"{dst}/attn/qkv/kernel", (D, D), ("qkv", j))
      if c.qkv_bias:
        s[f"{src}.attention.attention.{n}.bias"] = (f"{dst}/attn/qkv/bias", (D,), ("qkv", j))
    s |= _pair(f"{src}.attention.output.dense", f"{dst}/attn/proj", D, D)
    s |= _pair(f"{src}.layernorm_before", f"{dst}/norm1", D)
    s |= _pair(f"{src}.layernorm_after", f"{dst}/norm2", D)
    s |= _pair(f"{src}.intermediate.dense", f"{dst}/mlp/fc1", c.mlp, D)
    s |= _pair(f"{src}.output.dense", f"{dst}/mlp/fc2", D, c.mlp)
  return s


def _dino_spec(c: DINOConfig) -> dict:
  """Official DINO (timm/DeiT) keys."""
  D = c.width
  names = dict(cls="cls_token", pos="pos_embed", patch="patch_embed.proj", norm="norm")
  s = _common_spec(c, names)
  for i in range(c.layers):
    src, dst = f"blocks.{i}", f"blocks_{i}"
    s[f"{src}.attn.qkv.weight"] = (f"{dst}/attn/qkv/kernel", (3 * D, D), _T)
    if c.qkv_bias:
      s[f"{src}.attn.qkv.bias"] = (f"{dst}/attn/qkv/bias", (3 * D,), _ID)
    s |= _pair(f"{src}.attn.proj", f"{dst}/attn/proj", D, D)
    s |= _pair(f"{src}.norm1", f"{dst}/norm1", D)
    s |= _pair(f"{src}.norm2", f"{dst}/norm2", D)
    s |= _pair(f"{src}.mlp.fc1", f"{dst}/mlp/fc1", c.mlp, D)
    s |= _pair(f"{src}.mlp.fc2", f"{dst}/mlp/fc2", D, c.mlp)
  return s


def _apply_spec(sd: dict, spec: dict, path: Path) -> dict[str, np.ndarray]:
  """Validates sd against spec (all problems in one error) and returns our flat float32 dict."""
  weights_npz.check_against_spec(sd, spec, path, what="DINO")
  out, qkv = {}, {}
  for k, (dst, _, fn) in spec.items():
    a = np.asarray(sd[k], np.float32)
    if isinstance(fn, tuple):  # transformers' query/key/value: slot fn[1] of the fused qkv.
      qkv.setdefault(dst, [None] * 3)[fn[1]] = a.T if a.ndim == 2 else a
    else:
      out[dst] = np.ascontiguousarray(fn(a))
  for dst, parts in qkv.items():
    out[dst] = np.concatenate(parts, axis=-1)
  return out


def _check_against_model(flat: dict, cfg: DINOConfig, path: Path):
  """Guards the key maps themselves: the result must be exactly the Flax model's tree."""
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(DINO(cfg).init, jax.random.key(0), images)["params"]
  want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))
    raise ValueError(f"{path}: converted tree differs from the DINO model: {diff}")


# ---------------------------------------------------------------- readers


def _read_hf(src: _Source) -> tuple[DINOConfig, dict[str, np.ndarray]]:
  cfg = _config_from_hf(src.config)
  try:
    sd = weights_npz.read_safetensors(src.weights)
  except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files.
    raise weights_npz.invalid(src.weights, "DINO", ACCEPTED, e) from e
  # ViTModel saves bare keys; models wrapping one (ViTForImageClassification...) prefix `vit.`.
  sd = {k.removeprefix("vit."): v for k, v in sd.items()}
  sd = {k: v for k, v in sd.items() if not k.startswith(_HF_IGNORED_PREFIX)}
  return cfg, _apply_spec(sd, _hf_spec(cfg), src.weights)


def _read_torch(path: Path) -> dict[str, np.ndarray]:
  weights_npz.check_torch_file(path, what="DINO", accepted=ACCEPTED)
  torch = weights_npz.import_torch(path, what="a DINO .pth checkpoint")
  try:  # weights_only: tensors and plain containers only, never arbitrary unpickling.
    sd = torch.load(weights_npz.torch_source(path), map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - zip, pickle and torch errors alike.
    cause = f"not a torch state dict readable with weights_only=True: {type(e).__name__}"
    raise weights_npz.invalid(path, "DINO", ACCEPTED, cause) from e
  if isinstance(sd, dict) and isinstance(sd.get("teacher"), dict):
    # A DINO training checkpoint: the teacher is the network DINO evaluates and releases. Its
    # keys carry DDP's `module.` and `backbone.` prefixes, and `head.` holds the projection head
    # used only for the self-distillation loss (DINO's load_pretrained_weights drops it too).
    sd = {re.sub(r"^(module\.)?backbone\.", "", k): v for k, v in sd["teacher"].items()}
    sd = {k: v for k, v in sd.items() if not re.match(r"(module\.)?head\.", k)}
  if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
    cause = f"expected a state dict of tensors, got {type(sd).__name__}"
    raise weights_npz.invalid(path, "DINO", ACCEPTED, cause)
  return {k: v.detach().float().numpy() for k, v in sd.items()}


# ---------------------------------------------------------------- cache


def _read_npz(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
  return weights_npz.read(
    path, version=_CACHE_VERSION, what="DINO", accepted=ACCEPTED, kind=_CACHE_KIND
  )


def read_metadata(path) -> dict:
  """The JSON metadata of a converted .npz (kind, config, sha256, and "extra" for
  save_converted files), without reading its arrays ({} if it has none)."""
  return weights_npz.read_metadata(path)


def _valid_cache(src: _Source, cache: Path) -> bool:
  return weights_npz.valid_cache(
    cache, kind=_CACHE_KIND, version=_CACHE_VERSION, source=weights_npz.stamp(src.weights)
  )


def load_converted(
  path, *, heads: int | None = None, cache_dir=None
) -> tuple[DINOConfig, dict[str, np.ndarray], dict]:
  """(config, flat float32 arrays keyed "blocks_0/attn/qkv/kernel"..., metadata) from any source.

  metadata holds "sha256" of the weights file for a .pth conversion or its cache (and "config",
  "source"); it is {} for a Hugging Face directory, which is read directly each time.
  """
  src = _resolve(path)
  if src.kind == "hf":
    cfg, flat = _read_hf(src)
    if heads is not None and heads != cfg.heads:
      raise ValueError(f"{src.config}: num_attention_heads={cfg.heads} but heads={heads} given")
    _check_against_model(flat, cfg, src.weights)
    return cfg, flat, {}
  if src.kind == "npz":
    meta, flat = _read_npz(src.weights)
  else:
    cache = _cache_path(src, cache_dir)
    if _valid_cache(src, cache):
      meta, flat = _read_npz(cache)
    else:
      sd = _read_torch(src.weights)
      cfg = _config_from_dino(sd, src.weights, heads)
      flat = _apply_spec(sd, _dino_spec(cfg), src.weights)
      _check_against_model(flat, cfg, src.weights)
      meta = dict(
        kind=_CACHE_KIND,
        version=_CACHE_VERSION,
        config=dataclasses.asdict(cfg),
        source=weights_npz.stamp(src.weights),
        sha256=sha256_file(src.weights),
        source_path=weights_npz.absolute(src.weights),
      )
      weights_npz.write_cache(cache, meta, flat, what="DINO")
  cfg = DINOConfig(**meta["config"])
  if heads is not None and heads != cfg.heads:
    # The head count is not in the weights: a cache converted with another guess is still valid.
    if cfg.width % heads:
      raise ValueError(f"{path}: width {cfg.width} is not a multiple of heads={heads}")
    cfg = dataclasses.replace(cfg, heads=heads)
  return cfg, flat, meta


# ---------------------------------------------------------------- public


def load_dino(path, *, heads: int | None = None, dtype=jnp.float32, cache_dir=None):
  """Loads DINO v1 ViT weights -> (DINO model, params).

  path: Hugging Face directory, official .pth, or converted .npz (see the module docstring).
  heads: attention heads for a .pth of a width outside the known table (384 -> 6, 768 -> 12).
  dtype: compute dtype; Dense/Conv kernels and biases are stored in it, the rest float32.
  cache_dir: where a .pth's converted .npz goes (default: weights_npz.user_cache_dir()).
  """
  cfg, flat, _ = load_converted(path, heads=heads, cache_dir=cache_dir)
  params = traverse_util.unflatten_dict(
    {tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()}
  )
  return DINO(cfg, dtype=dtype), cast_for_compute(params, dtype)


def save_converted(
  path, cfg: DINOConfig, params, *, meta: dict | None = None, compress: bool = False
) -> Path:
  """Writes backbone params (e.g. a DINO trained in-process) as a converted .npz that load_dino
  reads; float32, checked against the model's tree.

  Its fingerprint is the sha256 of the parameter arrays; meta (JSON-serialisable) is stored
  under "extra" in the file's metadata. compress: zip-deflate (files that ship with the package).
  """
  return weights_npz.save_params(
    path,
    cfg,
    params,
    _check_against_model,
    meta=meta,
    compress=compress,
    kind=_CACHE_KIND,
    version=_CACHE_VERSION,
  )


def weights_fingerprint(path, *, cache_dir=None) -> str:
  """sha256 (hex) of the weights file (model.safetensors or the .pth), for checkpoints to record.

  For a .pth with a valid cache, read from the cache; for a converted .npz, the hash of the file
  it was converted from.
  """
  src = _resolve(path)
  if src.kind == "npz":
    return read_metadata(src.weights).get("sha256") or sha256_file(src.weights)
  if src.kind == "torch":
    cache = _cache_path(src, cache_dir)
    if _valid_cache(src, cache):
      return read_metadata(cache)["sha256"]
  return sha256_file(src.weights)
