"""CLIP (ViT image tower + causal text tower) in Flax linen.

Submodules are named after OpenAI's PyTorch state-dict keys (`visual.transformer.resblocks.3.
attn.in_proj`...), so weight conversion (convert.py) is key renaming plus transposes.

Shapes: B batch, H x W pixels, h x w patch grid, N = h*w patches, T = 1 + N tokens (CLS first),
W width, D embedding dim, L text length.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssr_jax import resize as resize_lib


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  embed_dim: int = 512
  image_size: int = 224  # Pretraining resolution; sets the learned position grid.
  patch_size: int = 16
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  # MLP hidden widths; None means 4 x the tower's width (OpenAI's ratio). OpenCLIP models use
  # others (ViT-bigG/14: 8192 for width 1664). 4 x width given explicitly is stored as None, so
  # equal architectures compare equal.
  vision_mlp: int | None = None
  text_mlp: int | None = None

  def __post_init__(self):
    for name, width in (("vision_mlp", self.vision_width), ("text_mlp", self.text_width)):
      if getattr(self, name) == 4 * width:
        object.__setattr__(self, name, None)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


CONFIGS = {
  "ViT-B/16": CLIPConfig(),
  "ViT-B/32": CLIPConfig(patch_size=32),
  "ViT-L/14": CLIPConfig(
    embed_dim=768,
    patch_size=14,
    vision_width=1024,
    vision_layers=24,
    vision_heads=16,
    text_width=768,
    text_heads=12,
  ),
}


class QuickGELU(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * jax.nn.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
  """PyTorch-style MHA with a fused in-projection; also returns head-averaged weights."""

  width: int
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    """x: [B, T, W]; mask: additive [T, T] or None. Returns ([B, T, W], attn [B, T, T] f32)."""
    b, t, _ = x.shape
    dh = self.width // self.heads
    qkv = nn.Dense(3 * self.width, dtype=self.dtype, name="in_proj")(x)
    # Heads-major once ([3, B, heads, T, dh]), so both attention products are plain batched
    # matmuls. Einsums on [B, T, heads, dh] made the ViT-B/16 encoder 1.3x slower on XLA:CPU
    # at 224 px (0.93 vs 0.73 s for 8 images on 2 cores).
    qkv = qkv.reshape(b, t, 3, self.heads, dh).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    # float32 logits straight from the matmul: rounding them to bf16 first would perturb the
    # softmax (and the attention maps used as affinities, method §1.4) by ~1% of the logit size.
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * (dh**-0.5), k, preferred_element_type=jnp.float32)
    if mask is not None:
      logits = logits + mask
    w = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", w.astype(self.dtype), v)
    out = out.transpose(0, 2, 1, 3).reshape(b, t, self.width)
    out = nn.Dense(self.width, dtype=self.dtype, name="out_proj")(out)
    return out, w.mean(axis=1)


class MLP(nn.Module):
  width: int
  dtype: Any = jnp.float32
  hidden: int | None = None  # None: 4 x width.

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden or 4 * self.width, dtype=self.dtype, name="c_fc")(x)
    return nn.Dense(self.width, dtype=self.dtype, name="c_proj")(QuickGELU()(x))


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block. `ln1_out` lets GradCAM differentiate w.r.t. ln_1's output (method §1.3)."""

  width: int
  heads: int
  dtype: Any = jnp.float32
  mlp_width: int | None = None  # MLP hidden width; None: 4 x width.

  def setup(self):
    self.ln_1 = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
    self.attn = MultiheadAttention(self.width, self.heads, dtype=self.dtype)
    self.ln_2 = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
    self.mlp = MLP(self.width, dtype=self.dtype, hidden=self.mlp_width)

  def __call__(self, x, mask=None, ln1_out=None):
    """x: [B, T, W] -> ([B, T, W], attn [B, T, T]). ln1_out replaces ln_1(x) when given."""
    h = self.ln_1(x) if ln1_out is None else ln1_out
    a, w = self.attn(h.astype(self.dtype), mask)
    x = x + a.astype(x.dtype)
    x = x + self.mlp(self.ln_2(x).astype(self.dtype)).astype(x.dtype)
    return x, w

  def pre_norm(self, x):
    return self.ln_1(x)


class Transformer(nn.Module):
  width: int
  layers: int
  heads: int
  dtype: Any = jnp.float32
  mlp_width: int | None = None  # MLP hidden width; None: 4 x width.

  def setup(self):
    self.resblocks = [
      ResidualAttentionBlock(
        self.width, self.heads, self.dtype, self.mlp_width, name=f"resblocks_{i}"
      )
      for i in range(self.layers)
    ]

  def __call__(self, x, mask=None, num_layers=None):
    """Runs the first num_layers blocks (all by default).

    Returns (x [B, T, W], hidden [layers, B, T, W] each block's output, attn [layers, B, T, T]).
    """
    hidden, attn = [], []
    for blk in self.resblocks[: self.layers if num_layers is None else num_layers]:
      x, w = blk(x, mask)
      hidden.append(x)
      attn.append(w)
    return x, jnp.stack(hidden), jnp.stack(attn)


class VisionTransformer(nn.Module):
  cfg: CLIPConfig
  dtype: Any = jnp.float32
  pos_interp: str = "bilinear"

  def setup(self):
    c = self.cfg
    w = c.vision_width
    self.conv1 = nn.Conv(
      w, (c.patch_size,) * 2, (c.patch_size,) * 2, use_bias=False, padding="VALID", dtype=self.dtype
    )
    init = nn.initializers.normal(w**-0.5)
    self.class_embedding = self.param("class_embedding", init, (w,))
    self.positional_embedding = self.param("positional_embedding", init, (c.grid**2 + 1, w))
    self.ln_pre = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
    self.transformer = Transformer(w, c.vision_layers, c.vision_heads, self.dtype, c.vision_mlp)
    self.ln_post = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
    self.proj = self.param("proj", init, (w, c.embed_dim))

  def pos_embed(self, h, w):
    """Position embeddings [1 + h*w, W] for an h x w patch grid (CLS entry kept as is)."""
    g = self.cfg.grid
    pos = self.positional_embedding
    if (h, w) == (g, g):
      return pos
    grid = resize_lib.resize(pos[1:].reshape(g, g, -1), (h, w), self.pos_interp)
    return jnp.concatenate([pos[:1], grid.reshape(h * w, -1)], axis=0)

  def embed(self, images):
    """images [B, H, W, 3] -> tokens [B, T, W] after ln_pre, and the grid (h, w)."""
    b, hh, ww, _ = images.shape
    p = self.cfg.patch_size
    if hh % p or ww % p:
      raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
    x = self.conv1(images.astype(self.dtype))
    h, w = x.shape[1:3]
    x = x.reshape(b, h * w, -1).astype(jnp.float32)
    cls = jnp.broadcast_to(self.class_embedding, (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed(h, w)
    return self.ln_pre(x), (h, w)

  def head(self, x):
    """Final LN + projection of pooled tokens [..., W] -> [..., D]."""
    return self.ln_post(x) @ self.proj

  def __call__(self, images, num_layers=None):
    """Returns dict(pooled [B, D], hidden [L, B, T, W], attn [L, B, T, T], grid (h, w))."""
    x, grid = self.embed(images)
    x, hidden, attn = self.transformer(x, num_layers=num_layers)
    return dict(pooled=self.head(x[:, 0]), hidden=hidden, attn=attn, grid=grid)


class TextTransformer(nn.Module):
  cfg: CLIPConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.cfg
    self.token_embedding = nn.Embed(
      c.vocab_size, c.text_width, embedding_init=nn.initializers.normal(0.02)
    )
    self.positional_embedding = self.param(
      "positional_embedding", nn.initializers.normal(0.01), (c.context_length, c.text_width)
    )
    self.transformer = Transformer(
      c.text_width, c.text_layers, c.text_heads, self.dtype, c.text_mlp
    )
    self.ln_final = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
    self.text_projection = self.param(
      "text_projection", nn.initializers.normal(c.text_width**-0.5), (c.text_width, c.embed_dim)
    )

  def __call__(self, input_ids):
    """input_ids int32 [N, L] (L <= context_length), EOT = the largest id -> [N, D]."""
    n, length = input_ids.shape
    x = self.token_embedding(input_ids) + self.positional_embedding[:length]
    mask = jnp.triu(jnp.full((length, length), -jnp.inf, jnp.float32), k=1)
    x, _, _ = self.transformer(x, mask)
    x = self.ln_final(x)
    eot = x[jnp.arange(n), jnp.argmax(input_ids, axis=-1)]
    return eot @ self.text_projection


class CLIP(nn.Module):
  """Both towers plus logit_scale. Param tree: {visual, text (flattened), logit_scale}."""

  cfg: CLIPConfig
  dtype: Any = jnp.float32
  pos_interp: str = "bilinear"

  def setup(self):
    self.visual = VisionTransformer(self.cfg, self.dtype, self.pos_interp)
    self.text = TextTransformer(self.cfg, self.dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(4.6052), ())

  def __call__(self, images, input_ids):
    """Returns (image embeds [B, D], text embeds [N, D], logit_scale) (not normalised)."""
    return self.encode_image(images), self.encode_text(input_ids), self.logit_scale

  def encode_image(self, images):
    """images float32 [B, H, W, 3], CLIP-normalised -> projected CLS embeddings [B, D]."""
    return self.visual(images)["pooled"]

  def encode_text(self, input_ids):
    """input_ids int32 [N, L] -> projected EOT embeddings [N, D]."""
    return self.text(input_ids)

  def image_features(self, images, num_layers=None):
    """Everything WSSS needs from one forward (see VisionTransformer.__call__)."""
    return self.visual(images, num_layers=num_layers)

  def last_block(self, x, ln1_out=None):
    """Runs the last visual block on tokens x [B, T, W]; see ResidualAttentionBlock."""
    return self.visual.transformer.resblocks[-1](x, ln1_out=ln1_out)

  def last_block_pre_norm(self, x):
    """ln_1 of the last visual block (the GradCAM target layer, method §1.3)."""
    return self.visual.transformer.resblocks[-1].pre_norm(x)

  def visual_head(self, x):
    """ln_post + proj of pooled visual tokens [..., W] -> [..., D]."""
    return self.visual.head(x)

  def patch_mean_head(self, patches):
    """WeCLIP's CAM-branch image feature: patch tokens [B, N, W] -> [B, D] (method §1.3).

    ln_post on every token, then the mean over the N tokens, then proj. LayerNorm is not linear,
    so this differs from `visual_head(patches.mean(1))`.
    """
    return self.visual.ln_post(patches).mean(axis=-2) @ self.visual.proj

  def token_features(self, tokens):
    """Dense projected features: ln_post + proj on every token [B, N, W] -> [B, N, D] (the
    dense visual features v that CMPA's ISA head maps, method §2.1)."""
    return self.visual.ln_post(tokens) @ self.visual.proj


def cast_for_compute(params, dtype):
  """Dense/Conv kernels and biases stored in the compute dtype; everything else as given.

  Flax casts those to the module's dtype on every call, so the outputs are bit-identical, but a
  frozen CLIP would pay that conversion every step (11 kernels per step on an H100 in bf16).
  LayerNorm scales/biases, embeddings and projections keep their precision.
  """
  if not isinstance(params, dict):
    return params
  if "kernel" in params:
    return {k: v.astype(dtype) if k in ("kernel", "bias") else v for k, v in params.items()}
  return {k: cast_for_compute(v, dtype) for k, v in params.items()}


def init_params(model: CLIP, rng, image_size=None):
  """Random params (tests, benchmarks, the demo's from-scratch CLIP)."""
  c = model.cfg
  s = image_size or c.image_size
  images = jnp.zeros((1, s, s, 3), jnp.float32)
  ids = jnp.zeros((1, c.context_length), jnp.int32)
  return jax.jit(model.init)(rng, images, ids)["params"]
