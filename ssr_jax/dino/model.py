"""DINO v1 ViT (pre-LN, CLS token, learned positions) in Flax linen; every layer's attention.

SGC fuses CLIP's attention with DINO ViT-S/16's (method §3.1); this module gives the latter.
The network is transformers' `ViTModel` without its pooler, which is also the official DINO
`VisionTransformer`: conv patch embedding, CLS token, learned position embeddings, pre-LN
blocks (fused-qkv attention, exact-erf GELU MLP) and a final LayerNorm.

Submodules are named after the official DINO state-dict keys (`blocks.3.attn.qkv`...), so
conversion (convert.py) is key renaming plus transposes; transformers' separate query/key/value
are concatenated into qkv.

Shapes: B batch, H x W pixels, h x w patch grid, N = h*w patches, T = 1 + N tokens (CLS first),
D width, L layers.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssr_jax import resize as resize_lib

# 0-1 RGB statistics of ImageNet: DINO was trained on images normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DINOConfig:
  image_size: int = 224  # Pretraining resolution; sets the learned position grid.
  patch_size: int = 16
  width: int = 384
  layers: int = 12
  heads: int = 6
  mlp: int = 1536  # Hidden width of each block's MLP (intermediate_size).
  # The official DINO code builds its LayerNorms with eps=1e-6; the facebook/dino-* configs on
  # the Hugging Face hub say 1e-12 (transformers' ViT default). Each loader takes its file's value.
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


CONFIGS = {
  "ViT-S/16": DINOConfig(),
  "ViT-B/16": DINOConfig(width=768, heads=12, mlp=3072),
  "ViT-S/8": DINOConfig(patch_size=8),
}


def normalize(images):
  """float 0-1 RGB images [B, H, W, 3] -> float32 normalised with ImageNet's mean and std."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in (IMAGENET_MEAN, IMAGENET_STD))
  return (images.astype(jnp.float32) - mean) / std


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection; also returns every head's weights."""

  width: int
  heads: int
  qkv_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, T, D] -> ([B, T, D], attention probabilities [B, heads, T, T] float32)."""
    b, t, _ = x.shape
    dh = self.width // self.heads
    qkv = nn.Dense(3 * self.width, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    # Heads-major once ([3, B, heads, T, dh]) so both products are batched matmuls (as in CLIP).
    qkv = qkv.reshape(b, t, 3, self.heads, dh).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    # Scaled after the product, as DINO and transformers do; float32 logits so bf16 compute does
    # not perturb the attention maps SGC uses as affinities.
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * dh**-0.5
    w = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", w.astype(self.dtype), v)
    out = out.transpose(0, 2, 1, 3).reshape(b, t, self.width)
    return nn.Dense(self.width, dtype=self.dtype, name="proj")(out), w


class Mlp(nn.Module):
  width: int
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    # Exact (erf) GELU: torch's nn.GELU() in DINO and transformers' "gelu".
    x = nn.gelu(x, approximate=False)
    return nn.Dense(self.width, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
  cfg: DINOConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, T, D] float32 -> ([B, T, D], attention [B, heads, T, T])."""
    c = self.cfg
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32, name=name)
    a, w = Attention(c.width, c.heads, c.qkv_bias, self.dtype, name="attn")(
      ln("norm1")(x).astype(self.dtype)
    )
    x = x + a.astype(x.dtype)
    h = Mlp(c.width, c.mlp, self.dtype, name="mlp")(ln("norm2")(x).astype(self.dtype))
    return x + h.astype(x.dtype), w


class DINO(nn.Module):
  """The ViT backbone. Param tree: {patch_embed, cls_token, pos_embed, blocks_i, norm}."""

  cfg: DINOConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.cfg
    p = c.patch_size
    self.patch_embed = nn.Conv(c.width, (p, p), (p, p), padding="VALID", dtype=self.dtype)
    init = nn.initializers.normal(0.02)
    # [1, 1, D] and [1, T, D] as in both checkpoint formats.
    self.cls_token = self.param("cls_token", init, (1, 1, c.width))
    self.pos_embed = self.param("pos_embed", init, (1, c.grid**2 + 1, c.width))
    self.blocks = [Block(c, self.dtype, name=f"blocks_{i}") for i in range(c.layers)]
    self.norm = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32)

  def position_embeddings(self, h, w):
    """Position embeddings [1, 1 + h*w, D] for an h x w patch grid (CLS entry kept as is).

    As transformers' ViTModel(interpolate_pos_encoding=True): the square pretraining grid is
    resized bicubically (F.interpolate, align_corners=False, which resize_lib reproduces) to the
    input's grid. DINO's own code resizes by a scale factor with a +0.1 offset instead; we match
    transformers, the reference the parity tests check.
    """
    g = self.cfg.grid
    pos = self.pos_embed
    if (h, w) == (g, g):
      return pos
    grid = resize_lib.resize(pos[0, 1:].reshape(g, g, -1), (h, w), "bicubic")
    return jnp.concatenate([pos[:, :1], grid.reshape(1, h * w, -1)], axis=1)

  def features(self, images, mask=None, mask_token=None):
    """images float32 [B, H, W, 3] (ImageNet-normalised, see `normalize`; H and W multiples of
    the patch size) -> dict(hidden [B, T, D] after the final LayerNorm, attn [L, B, heads, T, T]
    float32 softmax probabilities of every layer, grid (h, w)).

    mask: optional bool [B, N]; the embeddings of those patches are replaced by mask_token [D]
    before the position embeddings are added (iBOT's masked image modelling; the token belongs
    to the pretraining model, not to these params)."""
    b, hh, ww, _ = images.shape
    p = self.cfg.patch_size
    if hh % p or ww % p:
      raise ValueError(f"image size {hh}x{ww} is not a multiple of the DINO patch size {p}")
    x = self.patch_embed(images.astype(self.dtype))
    h, w = x.shape[1:3]
    x = x.reshape(b, h * w, -1).astype(jnp.float32)
    if mask is not None:
      x = jnp.where(mask[..., None], mask_token.astype(jnp.float32), x)
    cls = jnp.broadcast_to(self.cls_token, (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings(h, w)
    attn = []
    for blk in self.blocks:
      x, a = blk(x)
      attn.append(a)
    return dict(hidden=self.norm(x), attn=jnp.stack(attn), grid=(h, w))

  def __call__(self, images):
    """images [B, H, W, 3] -> last hidden state [B, T, D] (ViTModel's last_hidden_state)."""
    return self.features(images)["hidden"]

  def attention_maps(self, images):
    """images [B, H, W, 3] -> attention probabilities of every layer [L, B, heads, T, T]."""
    return self.features(images)["attn"]


def init_params(model: DINO, rng, image_size=None):
  """Random params (tests, benchmarks)."""
  s = image_size or model.cfg.image_size
  return jax.jit(model.init)(rng, jnp.zeros((1, s, s, 3), jnp.float32))["params"]
