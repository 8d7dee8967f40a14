"""WeCLIP's segmentation decoder over frozen CLIP block outputs (method §1.5), plus the CMPA head.

Shapes: L frozen layers, B batch, N = h*w patches, W CLIP width, E decoder width, C classes.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssr_jax.clip.model import Transformer


class LayerMLP(nn.Module):
  """One frozen layer's MLP: Linear(W -> E), ReLU, Linear(E -> E) on [..., W] tokens."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="fc2")(nn.relu(x))


class Decoder(nn.Module):
  """Per-layer MLPs -> concat -> 1x1 fuse -> Dropout2d -> 3 transformer blocks -> 1x1 head."""

  num_classes: int
  embed_dim: int = 256
  num_layers: int = 3
  num_heads: int = 8
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, *, train: bool):
    """hidden: [L, B, N, W] patch tokens of the frozen blocks (CLS dropped).

    Returns (logits [B, N, C] float32, feats [B, N, E] float32: the fused features F used by the
    RFM affinity and CMPA, §1.5).
    """
    e = self.embed_dim
    num_layers, b, n, _ = hidden.shape
    # A separate MLP per layer, as WeCLIP, with the L layers' params stacked on a leading axis
    # so that each linear map is one batched matmul: per-layer Denses cost ~15 small kernels
    # per layer and step on GPU (a third of the step's 1,139 kernels on an H100 were the decoder's).
    mlps = nn.vmap(
      LayerMLP,
      in_axes=0,
      out_axes=0,
      variable_axes={"params": 0},
      split_rngs={"params": True},
    )(e, dtype=self.dtype, name="mlps")
    maps = mlps(hidden)  # [L, B, N, E]
    # Channel concatenation in layer order (channel l*E + k), as torch.cat of the L maps.
    maps = jnp.moveaxis(maps, 0, 2).reshape(b, n, num_layers * e)
    x = nn.Dense(e, dtype=self.dtype, name="fuse")(maps)
    # Dropout2d drops whole channels per image: share the mask over the N patches.
    x = nn.Dropout(self.dropout, broadcast_dims=(1,), deterministic=not train)(x)
    feats = x.astype(jnp.float32)
    # WeCLIP's decoder blocks are CLIP residual blocks without positional embeddings (so their
    # MLP width is CLIP's 4 * embed_dim).
    x, _, _ = Transformer(e, self.num_layers, self.num_heads, self.dtype, name="transformer")(feats)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32), feats


class ProjectionHead(nn.Module):
  """CMPA projection F -> text space, L2-normalised per patch (method §2.1)."""

  out_dim: int
  kind: str = "linear"  # linear | mlp
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats):
    """feats [B, N, E] -> z [B, N, D] float32, unit norm."""
    x = feats
    if self.kind == "mlp":
      x = nn.relu(nn.Dense(x.shape[-1], dtype=self.dtype, name="fc1")(x))
    elif self.kind != "linear":
      raise ValueError(f"model.cmpa.proj={self.kind!r}: use 'linear' or 'mlp'")
    z = nn.Dense(self.out_dim, dtype=self.dtype, name="proj")(x).astype(jnp.float32)
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-6)
