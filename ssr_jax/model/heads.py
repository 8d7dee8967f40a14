"""CMPA's projection heads ISA (image) and TSA (text): method §2.1.

The paper says only "stacked linear layers, batch normalisation and ReLU", same structure and
separate parameters for the two heads, mapping CLIP's width d1 to d2. The depth and widths are
ours ([inferred] default: Linear(512 -> 512) -> BN -> ReLU -> Linear(512 -> 256), L2-normalised
outputs), all module attributes.

One class serves both heads (two instances). Not decoder.ProjectionHead, the [v1] decoder-side
projection.

BatchNorm statistics live in the 'batch_stats' collection (part of the train state); `train`
picks batch statistics (and updates the running ones) or the running averages.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class AlignmentHead(nn.Module):
  """x [..., D] -> [..., out_dim]: (Linear -> BatchNorm -> ReLU) per hidden width, then Linear.

  Attributes:
    hidden: widths of the Linear -> BN -> ReLU layers (the paper's "stacked" layers); () gives a
      single Linear.
    out_dim: d2, the width of the shared (prototype) space.
    normalize: L2-normalise the outputs (cosine geometry for the prototype loss).
    momentum: flax convention, running = momentum * running + (1 - momentum) * batch;
      0.9 is PyTorch's BatchNorm default (its momentum 0.1).
    epsilon: added to the variance, PyTorch's default.
  """

  hidden: tuple[int, ...] = (512,)
  out_dim: int = 256
  normalize: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    """x: [..., D] features; mask: optional bool [...] of the rows that enter the batch
    statistics (padding rows are still transformed, with the statistics of the valid ones).

    Returns [..., out_dim] (unit rows if `normalize`; float32).
    """
    m = None if mask is None else jnp.asarray(mask, bool)[..., None]
    for i, width in enumerate(self.hidden):
      # No bias: BatchNorm subtracts it again, so its gradient is zero up to rounding, which
      # Adam would turn into full-size random steps.
      x = nn.Dense(width, use_bias=False, dtype=self.dtype, name=f"dense_{i}")(x)
      # Statistics in float32 whatever the compute dtype: the batch here is a few hundred rows.
      x = nn.BatchNorm(
        use_running_average=not train,
        momentum=self.momentum,
        epsilon=self.epsilon,
        dtype=jnp.float32,
        name=f"bn_{i}",
      )(x, mask=m)
      x = nn.relu(x)
    x = nn.Dense(self.out_dim, dtype=self.dtype, name="out")(x).astype(jnp.float32)
    if self.normalize:  # rsqrt of a clamped square: finite gradients even at a zero row.
      x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
    return x
