"""The demo's tiny DINO, pretrained from scratch: a denoising autoencoder by default, with DINO
self-distillation (Caron et al., 2021), iBOT (Zhou et al., 2022) and SimMIM's masked pixels
(Xie et al., 2022) as options of the same loop.

SGC fuses CLIP's attention with a self-supervised ViT's (method §3.1), for its "fine spatial
relations": attention that stays within objects. The embedded demo has no ImageNet DINO, so it
trains a tiny ViT of DINO's architecture on a stream of unlabelled images (the caller's
`images(step)`; the demo's is the synthetic generator's, no masks, labels or captions). DINO's
own recipe, scaled down, left that attention at chance in this world (`Recipe` lists what was
tried, with the figures), so the shipped recipe is the one that gave it segment-following
attention; its terms, each weighted by `Recipe`:
- pixels (the default): the student's 2 global crops get Gaussian noise, and a linear head on
  each patch token regresses that patch's clean pixels (L1); with noise 0, only patches hidden
  behind a learned mask token are scored (masked image modelling);
- DINO's CLS term: student and teacher are the same `ssr_jax.dino` ViT plus a projection head
  (3-layer GELU MLP -> bottleneck -> L2 normalisation -> weight-normalised linear layer onto
  `out_dim` prototypes); the teacher is an EMA of the student (momentum cosine from 0.996 to 1)
  and gets no gradient; the student sees 2 global and a few local crops, the teacher the global
  ones, and the loss is the cross-entropy between the teacher's centred, sharpened softmax and
  the student's over every (teacher view, other student view) pair;
- iBOT: masked patches of the student's global views learn the teacher's distribution for
  those patches unmasked (shared head, a separate centre);
- a cross-view patch term (`dense_loss`): each patch of one global view learns the teacher's
  distribution for the patch of the other view that shows the same image point.
Crops are random-resized, flipped and colour-jittered, all in numpy. AdamW with linear warm-up
and cosine decay, no weight decay on biases and LayerNorms, gradient clipping, and for DINO the
last head layer frozen for the first steps (as DINO's first epoch). The teacher is only built
into the step when a term distils from it; otherwise the student is the result.
Position embeddings are learned for the full image's grid and interpolated (bicubic, as
`DINO.position_embeddings`) for the crops' smaller grids. `pretrain_dino` checkpoints with Orbax
and resumes bit-identically (the batches and augmentations are functions of the step).

`attention_purity` measures, with the val masks, how much of each patch's attention stays in
its own ground-truth segment: the property SGC's propagation needs from an affinity.

Shapes: B images, V student views (2 global + local), G = 2 global views, K prototypes,
S image side (pixels), T = 1 + N tokens, P patch side.
"""

import dataclasses
import functools
import logging
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from ssr_jax.dino.model import DINO, DINOConfig, normalize

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The tiny DINO's pretraining hyperparameters that the demo config does not expose (stored
  with the weights).

  The defaults train it as a denoising autoencoder (pixel_weight with noise_std; no
  distillation term), which is what made its attention group segments in this world. DINO's
  self-distillation (cls_weight), iBOT (ibot_weight, mask_prob) and masked pixel prediction
  (pixel_weight with mask_prob and noise_std 0) stay available; segment-weighted attention
  purity on val of the 3 layers' mean, 96-wide 3-layer ViT, batch 32 (uniform attention 0.416,
  a random ViT 0.402, the tiny CLIP 0.537):
    DINO + iBOT (the previous recipe), 600 steps at batch 64:        0.383
    DINO + iBOT, teacher momentum 0.98 instead of 0.996, 150 steps:  0.410
    masked pixels (SimMIM, 40-60% masked), 750 steps:                 0.450
    masked pixels, 60-80% masked, 500 steps:                          0.466
    DINO + iBOT + denoising pixels, 300 steps:                        0.550
    denoising pixels + 30-50% masked, 400 steps:                      0.814
    denoising pixels (these defaults), 150 steps:                     0.860
  A distillation target in this world is predicted by a token's own colour and the image mean,
  and a masked patch by its neighbours, so neither needs attention that follows segments; a
  noisy patch's clean pixels are best estimated from the other patches that show the same
  surface, which is attention within the segment (as non-local means denoising).
  """

  # Crop sides in pixels before clamping to the image and rounding down to the patch size. Global
  # crops of 64 px (8x8 patches) instead of the full 96 px cost 45% of the tokens, so twice the
  # steps fit in the time budget; the full-size grid still gets position gradients through the
  # interpolation.
  global_size: int = 64
  local_size: int = 32
  num_local: int = 0  # Local crops (DINO's CLS term only); DINO's recipe used 4.
  global_scale: tuple[float, float] = (0.4, 1.0)  # Area fraction of the image, as DINO.
  local_scale: tuple[float, float] = (0.1, 0.4)
  # Weight of DINO's CLS self-distillation (`dino_loss`), student on every crop, EMA teacher on
  # the global ones. 0 skips it (and the teacher, when no other term distills).
  cls_weight: float = 0.0
  # Weight of the patch-level term (dense_loss); 0 is DINO v1 (and skips its cost). It did not
  # make the tiny DINO's attention more segment-pure in our runs (300 steps, plain purity of the
  # layers' mean 0.616 with it vs 0.631 without at lr 5e-4, 0.601 vs 0.642 at 2e-3).
  dense_weight: float = 0.0
  # Weight of iBOT's masked patch prediction (`masked_patch_loss`); 0 skips it. A share
  # mask_prob of the student's global views has a mask_ratio share of its patches replaced by a
  # learned mask token, and each masked patch learns the teacher's distribution for the same
  # patch unmasked (patch-level self-distillation, Zhou et al., 2022).
  ibot_weight: float = 0.0
  mask_prob: float = 0.0
  mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT's per-view range.
  # Weight of pixel prediction (`masked_pixel_loss`: L1 to the clean, ImageNet-normalised pixels
  # through a linear head on each patch token); 0 skips it. With noise_std > 0 the student's
  # global views get Gaussian noise of that std (normalised units) and every patch is scored
  # (denoising); with noise_std 0 only the masked patches are (SimMIM).
  pixel_weight: float = 1.0
  noise_std: float = 1.0
  out_dim: int = 1024  # Prototypes; DINO's 65,536 scaled to a 512-image dataset.
  head_hidden: int = 256
  head_bottleneck: int = 64
  student_temp: float = 0.1
  teacher_temp: float = 0.04
  warmup_teacher_temp: float = 0.04
  warmup_teacher_temp_frac: float = 0.0  # Share of the steps over which it rises linearly.
  center_momentum: float = 0.9
  teacher_momentum: float = 0.996  # Start of the cosine schedule to 1.
  weight_decay: float = 0.04
  warmup_frac: float = 0.1  # Learning-rate warm-up, as a share of the steps.
  min_lr: float = 1e-6
  clip_grad: float = 3.0
  freeze_last_layer_frac: float = 0.05  # DINO freezes the last layer for its first epoch.
  # Brightness, contrast and saturation factors in [1 - j, 1 + j]. Milder than DINO's 0.4 and
  # no grayscale: colour is what tells this world's objects and backgrounds apart.
  jitter: float = 0.2
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.0


RECIPE = Recipe()


# ---------------------------------------------------------------- model


class DINOHead(nn.Module):
  """DINO's projection head: [B, D] CLS features -> [B, out_dim] prototype scores."""

  out_dim: int
  hidden: int
  bottleneck: int

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.truncated_normal(0.02)  # DINO's trunc_normal_(std=.02), zero bias.
    x = nn.gelu(nn.Dense(self.hidden, kernel_init=init, name="mlp_0")(x), approximate=False)
    x = nn.gelu(nn.Dense(self.hidden, kernel_init=init, name="mlp_1")(x), approximate=False)
    x = nn.Dense(self.bottleneck, kernel_init=init, name="mlp_2")(x)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize.
    # weight_norm(Linear) with its gain fixed at 1 (DINO's norm_last_layer=True): each
    # prototype is a unit vector, so the scores are cosines and cannot grow to collapse.
    v = self.param("last_layer", init, (self.bottleneck, self.out_dim))
    return x @ (v / jnp.linalg.norm(v, axis=0, keepdims=True))


class Distiller(nn.Module):
  """ViT backbone + DINO head. Param tree: {backbone: DINO params, head: DINOHead params}."""

  cfg: DINOConfig
  recipe: Recipe = RECIPE

  def setup(self):
    r = self.recipe
    self.backbone = DINO(self.cfg)
    self.head = DINOHead(r.out_dim, r.head_hidden, r.head_bottleneck)
    if r.ibot_weight > 0 or (r.pixel_weight > 0 and r.mask_prob > 0):
      self.mask_token = self.param("mask_token", nn.initializers.zeros, (self.cfg.width,))
    if r.pixel_weight > 0:
      self.pixel_head = nn.Dense(3 * self.cfg.patch_size**2, name="pixel_head")

  def __call__(self, images, patches=False, mask=None):
    """normalised images [B, H, W, 3] -> dict(cls [B, K] prototype scores of the final CLS
    token; with patches=True also patch [B, N, K] those of every patch token (the head is
    shared, as iBOT's) and, with pixel_weight > 0, pixels [B, N, 3 * P * P] every patch's
    predicted pixels). mask: optional bool [B, N] patches replaced by the mask token."""
    if mask is None:
      x = self.backbone(images)
    else:
      x = self.backbone.features(images, mask, self.mask_token)["hidden"]
    if not patches:
      return dict(cls=self.head(x[:, 0]))
    out = dict(cls=None, patch=None)
    if self.recipe.ibot_weight > 0 or self.recipe.dense_weight > 0:
      scores = self.head(x)
      out.update(cls=scores[:, 0], patch=scores[:, 1:])
    else:
      out.update(cls=self.head(x[:, 0]))
    if self.recipe.pixel_weight > 0:
      out.update(pixels=self.pixel_head(x[:, 1:]))
    return out


# ---------------------------------------------------------------- loss and schedules


def dino_loss(student, teacher, center, *, student_temp, teacher_temp):
  """DINO's self-distillation loss.

  student: float32 [V, B, K] raw scores of every view (the G global views first, in the
  teacher's order); teacher: [G, B, K] raw scores of the global views; center: [K].
  Returns the mean over (teacher view g, student view v != g) pairs of the batch-mean
  cross-entropy H(softmax((teacher_g - center) / teacher_temp), softmax(student_v /
  student_temp)). Gradients do not flow into the teacher.
  """
  t = jax.nn.softmax((jax.lax.stop_gradient(teacher) - center) / teacher_temp, axis=-1)
  logp = jax.nn.log_softmax(student / student_temp, axis=-1)
  ce = -jnp.einsum("gbk,vbk->gv", t, logp) / student.shape[1]  # [G, V] batch means.
  g, v = ce.shape
  # A teacher view is never the target of the student's same view (DINO's `v == iq` skip).
  keep = 1.0 - jnp.eye(g, v)
  return (ce * keep).sum() / keep.sum()


def update_center(center, teacher, momentum):
  """EMA of the teacher's batch-mean raw scores: center [K], teacher [G, B, K] -> [K]."""
  return center * momentum + teacher.mean(axis=(0, 1)) * (1.0 - momentum)


def dense_loss(student, teacher, center, index, valid, *, student_temp, teacher_temp):
  """Patch-level self-distillation between the two global views.

  student, teacher: float32 [2, B, N, K] raw patch scores of global views 0 and 1; center: [K];
  index: int [2, B, N] the patch of the other view at the same image point (`match_patches`);
  valid: float [2, B, N] 1 where that point lies inside the other view. Each student patch of
  view a learns the centred, sharpened teacher distribution of the patch of view 1 - a that
  shows the same image point (DenseCL/iBOT-style targets, but across views by geometry, so the
  backbone needs no mask token). Returns the mean cross-entropy over valid patches.
  """
  t = jax.nn.softmax((jax.lax.stop_gradient(teacher) - center) / teacher_temp, axis=-1)
  t = jnp.take_along_axis(t[::-1], index[..., None], axis=2)  # Other view, matched patch.
  ce = -(t * jax.nn.log_softmax(student / student_temp, axis=-1)).sum(-1)
  return (ce * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def masked_patch_loss(student, teacher, center, mask, *, student_temp, teacher_temp):
  """iBOT's masked image modelling loss on the global views.

  student: float32 [G, B, N, K] raw patch scores of the masked views; teacher: [G, B, N, K] those
  of the same views unmasked; center: [K]; mask: bool [G, B, N]. Each masked student patch
  learns the centred, sharpened teacher distribution of the same patch. Returns the mean
  cross-entropy over masked patches (0 when none is masked).
  """
  t = jax.nn.softmax((jax.lax.stop_gradient(teacher) - center) / teacher_temp, axis=-1)
  ce = -(t * jax.nn.log_softmax(student / student_temp, axis=-1)).sum(-1)
  m = mask.astype(jnp.float32)
  return (ce * m).sum() / jnp.maximum(m.sum(), 1.0)


def patchify(images, patch):
  """[B, H, W, C] -> [B, (H / P) * (W / P), P * P * C] row-major patches, each row-major."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def masked_pixel_loss(pred, target, mask):
  """SimMIM's loss: mean L1 between predicted and true pixels over the masked patches.

  pred, target: float32 [..., N, P * P * 3]; mask: bool [..., N]. 0 when none is masked.
  """
  m = mask.astype(jnp.float32)
  l1 = jnp.abs(pred - jax.lax.stop_gradient(target)).mean(-1)
  return (l1 * m).sum() / jnp.maximum(m.sum(), 1.0)


def teacher_momentum(step, steps, base):
  """Cosine from base at step 0 to 1 at the last step (DINO's momentum schedule)."""
  return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(1, steps)) + 1.0) / 2.0


def teacher_temperature(step, steps, recipe: Recipe):
  """Linear warm-up from warmup_teacher_temp to teacher_temp, then constant."""
  warm = int(recipe.warmup_teacher_temp_frac * steps)
  if step >= warm:
    return recipe.teacher_temp
  return recipe.warmup_teacher_temp + (recipe.teacher_temp - recipe.warmup_teacher_temp) * (
    step / warm
  )


def ema(teacher, student, momentum):
  """teacher <- momentum * teacher + (1 - momentum) * student, leaf by leaf."""
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)


# ---------------------------------------------------------------- multi-crop (numpy)


def crop_sizes(image_size, patch, recipe: Recipe = RECIPE):
  """(global, local) crop sides: the recipe's, clamped to the image, multiples of the patch."""
  side = lambda px: max(patch, min(px, image_size) // patch * patch)
  return side(recipe.global_size), side(recipe.local_size)


def _crop_box(s, rng, scale):
  """torchvision's RandomResizedCrop box (x0, y0, w, h) in an S x S image (ratio 3/4-4/3)."""
  area = rng.uniform(*scale) * s * s
  ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
  w = min(s, max(1, round(math.sqrt(area * ratio))))
  h = min(s, max(1, round(math.sqrt(area / ratio))))
  return int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1)), w, h


def _resized_crop(img, box, out):
  """uint8 [S, S, 3] -> uint8 [out, out, 3] of box (x0, y0, w, h)."""
  x0, y0, w, h = box
  # PIL crops and resizes in one pass, antialiasing when it shrinks.
  pil = Image.fromarray(img).resize((out, out), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
  return np.asarray(pil)


def match_patches(boxes, flips, grid):
  """For each patch of global view a, the patch of view 1 - a at the same image point.

  boxes: [2, B, 4] crop boxes (x0, y0, w, h) in image pixels; flips: bool [2, B] (view mirrored
  after cropping); grid: patches per side of the (square) views. Returns (index int32 [2, B, N]
  row-major patch of the other view under each patch centre, valid float32 [2, B, N] 1 where
  that centre lies inside the other view).
  """
  c = (np.arange(grid) + 0.5) / grid  # Patch centres as fractions of the view.
  u, v = np.meshgrid(c, c)  # [g, g]: x (column) and y (row) fractions.
  boxes = boxes.astype(np.float64)[..., None, None]  # [2, B, 4, 1, 1]
  u = np.where(flips[..., None, None], 1.0 - u, u)
  x = boxes[:, :, 0] + u * boxes[:, :, 2]  # [2, B, g, g] image coordinates.
  y = boxes[:, :, 1] + v * boxes[:, :, 3]
  other = boxes[::-1]
  uo = (x - other[:, :, 0]) / other[:, :, 2]
  vo = (y - other[:, :, 1]) / other[:, :, 3]
  valid = (uo >= 0) & (uo < 1) & (vo >= 0) & (vo < 1)
  uo = np.where(flips[::-1][..., None, None], 1.0 - uo, uo)
  col = np.clip(np.floor(uo * grid), 0, grid - 1)
  row = np.clip(np.floor(vo * grid), 0, grid - 1)
  n = (2, boxes.shape[1], grid * grid)
  index = (row * grid + col).astype(np.int32).reshape(n)
  return index, valid.astype(np.float32).reshape(n)


def _gray(x):
  """[..., 3] -> [..., 1] ITU-R 601 luma, as torchvision's rgb_to_grayscale."""
  return (x @ np.float32([0.299, 0.587, 0.114]))[..., None]


def _jitter(x, rng, recipe: Recipe):
  """float32 0-1 crops [B, s, s, 3]: per-crop colour jitter and grayscale."""
  b = x.shape[0]
  j = recipe.jitter
  on = (rng.random(b) < recipe.jitter_prob)[:, None, None, None]
  bright, contrast, sat = (rng.uniform(1 - j, 1 + j, (b, 1, 1, 1)) for _ in range(3))
  # torchvision's order and formulas: brightness scales, contrast blends with the mean grey
  # level, saturation with the grey image.
  y = x * bright
  mean = _gray(y).mean(axis=(1, 2, 3), keepdims=True)
  y = (y - mean) * contrast + mean
  g = _gray(y)
  y = (y - g) * sat + g
  x = np.where(on, np.clip(y, 0.0, 1.0), x)
  to_gray = (rng.random(b) < recipe.grayscale_prob)[:, None, None, None]
  return np.where(to_gray, np.broadcast_to(_gray(x), x.shape), x).astype(np.float32)


def patch_masks(rng, shape, recipe: Recipe = RECIPE):
  """bool [*shape[:-1], N] iBOT masks: each view, with probability mask_prob, has a share drawn
  from mask_ratio of its N = shape[-1] patches masked (at random positions, at least one)."""
  *views, n = shape
  ratio = rng.uniform(*recipe.mask_ratio, views) * (rng.random(views) < recipe.mask_prob)
  count = np.where(ratio > 0, np.maximum(1, np.round(ratio * n)), 0)
  rank = rng.random((*views, n)).argsort(-1).argsort(-1)  # A random permutation per view.
  return rank < count[..., None]


def multicrop(images, rng, *, patch, recipe: Recipe = RECIPE):
  """uint8 images [B, S, S, 3] -> dict of augmented views, each crop independently cropped,
  flipped, colour-jittered and maybe greyed:
  global float32 0-1 [2, B, g, g, 3], local [num_local, B, l, l, 3], index / valid
  [2, B, (g / patch)^2] matching the global views' patches (`match_patches`) and mask bool
  [2, B, (g / patch)^2] the patches the student's global views hide (`patch_masks`)."""
  b, s = images.shape[:2]
  gs, ls = crop_sizes(s, patch, recipe)

  def views(n, size, scale):
    if n == 0:
      return np.zeros((0, b, size, size, 3), np.float32), None, None
    boxes = np.array([[_crop_box(s, rng, scale) for _ in range(b)] for _ in range(n)])
    out = np.stack(
      [[_resized_crop(im, box, size) for im, box in zip(images, bx)] for bx in boxes]
    ).reshape(n * b, size, size, 3)
    flips = rng.random(n * b) < 0.5
    out[flips] = out[flips, :, ::-1]
    out = _jitter(out.astype(np.float32) / 255.0, rng, recipe)
    return out.reshape(n, b, size, size, 3), boxes, flips.reshape(n, b)

  g, boxes, flips = views(2, gs, recipe.global_scale)
  lo, _, _ = views(recipe.num_local, ls, recipe.local_scale)
  index, valid = match_patches(boxes, flips, gs // patch)
  mask = patch_masks(rng, index.shape, recipe)
  out = dict(globals=g, locals=lo, index=index, valid=valid, mask=mask)
  if recipe.noise_std > 0:
    out["noise"] = (rng.standard_normal(g.shape) * recipe.noise_std).astype(np.float32)
  return out


# ---------------------------------------------------------------- training


def _decay_mask(params):
  """Weight decay on matrices and embeddings only, not on biases or LayerNorms (as DINO)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(*, lr, steps, recipe: Recipe = RECIPE):
  warmup = max(1, int(recipe.warmup_frac * steps))
  sched = optax.warmup_cosine_decay_schedule(
    0.0, lr, warmup, max(steps, warmup + 1), end_value=recipe.min_lr
  )
  return optax.chain(
    optax.clip_by_global_norm(recipe.clip_grad),
    optax.adamw(sched, weight_decay=recipe.weight_decay, mask=_decay_mask),
  )


def init_state(model: Distiller, tx, rng, image_size):
  """dict(student, teacher (a copy of the student), opt, center and center_patch [K] zeros)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = jax.jit(functools.partial(model.init, patches=True))(rng, x)
  params = params["params"]
  k = model.recipe.out_dim
  return dict(
    student=params,
    teacher=jax.tree.map(jnp.array, params),
    opt=tx.init(params),
    center=jnp.zeros((k,), jnp.float32),
    # The patch scores' own centre, as iBOT's center2 (a distinct buffer: the state is donated).
    center_patch=jnp.zeros((k,), jnp.float32),
  )


def distills_from_teacher(recipe: Recipe) -> bool:
  """Whether a term learns the EMA teacher's outputs (else the teacher is unused)."""
  return recipe.cls_weight > 0 or recipe.ibot_weight > 0 or recipe.dense_weight > 0


def make_step(model: Distiller, tx):
  """The jitted update: step(state, crops, sched) -> (state, metrics).

  crops: `multicrop`'s dict (globals float32 0-1 [2, B, g, g, 3], locals [L, B, l, l, 3],
  index, valid and mask [2, B, N]); sched: dict of float32 scalars teacher_temp, momentum (the
  EMA momentum for this step) and freeze (1.0 while the last head layer is frozen). The state is
  donated. The teacher is updated with the new student, after the optimizer step, as DINO does.
  With ibot_weight > 0 the student's global views are masked (for its CLS term too, as iBOT's).
  """
  r = model.recipe
  # Static: the teacher, patch outputs and masks only when a term needs them.
  dense, ibot, pixel = r.dense_weight > 0, r.ibot_weight > 0, r.pixel_weight > 0
  distills = distills_from_teacher(r)
  masked = ibot or (pixel and r.mask_prob > 0)

  def outputs(params, views, patches, mask=None, noise=None):
    n, b = views.shape[:2]
    flat = normalize(views.reshape(n * b, *views.shape[2:]))
    if noise is not None:
      flat = flat + noise.reshape(flat.shape)
    if mask is not None:
      mask = mask.reshape(n * b, -1)
    out = model.apply({"params": params}, flat, patches=patches, mask=mask)
    return {k: None if v is None else v.reshape(n, b, *v.shape[1:]) for k, v in out.items()}

  def loss_fn(student, teacher, centers, crops, temp):
    temps = dict(student_temp=r.student_temp, teacher_temp=temp)
    g = crops["globals"]
    t = outputs(teacher, g, dense or ibot) if distills else dict(cls=None)
    s = outputs(student, g, True, crops["mask"] if masked else None, crops.get("noise"))
    terms = {k: jnp.zeros((), jnp.float32) for k in ("cls", "dense", "ibot", "pixel")}
    if dense:
      terms["dense"] = dense_loss(
        s["patch"], t["patch"], centers[1], crops["index"], crops["valid"], **temps
      )
    if ibot:
      terms["ibot"] = masked_patch_loss(s["patch"], t["patch"], centers[1], crops["mask"], **temps)
    if pixel:
      target = patchify(normalize(g.reshape(-1, *g.shape[2:])), model.cfg.patch_size)
      # Denoising scores every patch; plain masked image modelling the hidden ones.
      where = jnp.ones(s["pixels"].shape[:-1], bool) if r.noise_std > 0 else crops["mask"]
      terms["pixel"] = masked_pixel_loss(s["pixels"], target.reshape(s["pixels"].shape), where)
    if r.cls_weight > 0:
      s_cls = jnp.concatenate([s["cls"], outputs(student, crops["locals"], False)["cls"]])
      terms["cls"] = dino_loss(s_cls, t["cls"], centers[0], **temps)
    weights = dict(cls=r.cls_weight, dense=r.dense_weight, ibot=r.ibot_weight, pixel=r.pixel_weight)
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, (terms, t["cls"], t.get("patch"))

  def step(state, crops, sched):
    centers = (state["center"], state["center_patch"])
    (loss, (terms, t_cls, t_patch)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["student"], state["teacher"], centers, crops, sched["teacher_temp"]
    )
    updates, opt = tx.update(grads, state["opt"], state["student"])
    # Frozen last layer: its update (Adam step and weight decay) is dropped, as DINO drops the
    # gradient, so the prototypes do not chase a still-random backbone.
    keep = 1.0 - sched["freeze"]
    updates["head"]["last_layer"] = updates["head"]["last_layer"] * keep
    student = optax.apply_updates(state["student"], updates)
    new = dict(
      student=student,
      teacher=ema(state["teacher"], student, sched["momentum"]) if distills else state["teacher"],
      opt=opt,
      center=state["center"]
      if t_cls is None
      else update_center(state["center"], t_cls, r.center_momentum),
      center_patch=state["center_patch"]
      if t_patch is None
      else update_center(
        state["center_patch"], t_patch.reshape(2, -1, t_patch.shape[-1]), r.center_momentum
      ),
    )
    return new, dict(loss=loss, **terms, grad_norm=optax.global_norm(grads))

  return jax.jit(step, donate_argnums=0)


def schedule(step, steps, recipe: Recipe = RECIPE):
  """The host-side per-step scalars make_step's update takes."""
  return dict(
    teacher_temp=np.float32(teacher_temperature(step, steps, recipe)),
    momentum=np.float32(teacher_momentum(step, steps, recipe.teacher_momentum)),
    freeze=np.float32(step < int(recipe.freeze_last_layer_frac * steps)),
  )


def pretrain_dino(
  cfg: DINOConfig,
  images,
  *,
  steps,
  lr,
  seed,
  recipe: Recipe = RECIPE,
  workdir=None,
  settings=None,
  save_every=100,
  evaluate=None,
  eval_every=0,
):
  """DINO self-distillation on a stream of images (images only: no masks or labels).

  images: step -> uint8 [B, S, S, 3], the batch of that step; a pure function of the step, so
  that a resumed run sees the batches an uninterrupted one would. Augmentations come from numpy
  generators seeded by (seed, step), the init from PRNGKey(seed): the run is deterministic.
  workdir: if given, the state is checkpointed with Orbax under workdir/checkpoints every
  save_every steps and at the end, and a rerun resumes from the latest checkpoint, continuing
  bit-identically (it must have the same settings, a JSON-able dict of everything the weights
  depend on, stored with each checkpoint; a mismatch raises ValueError before any step).
  evaluate: optional callable(step, teacher backbone params) run every eval_every steps (> 0).
  Returns (teacher backbone params, dict(final_loss, seconds, steps_run)): seconds is the
  pretraining time over all runs, steps_run the steps this call made.
  """
  from ssr_jax.train.resumable import Resumable  # Late: orbax only when pretraining.

  model = Distiller(cfg, recipe)
  tx = make_optimizer(lr=lr, steps=steps, recipe=recipe)
  state = init_state(model, tx, jax.random.PRNGKey(seed), cfg.image_size)
  step_fn = make_step(model, tx)
  run, start, loss, t0 = None, 0, float("nan"), time.time()
  if workdir is not None:
    run = Resumable(workdir, state, settings=settings or {}, what="tiny DINO pretraining")
    start, state, loss = run.start, run.state, run.loss
  elapsed = run.elapsed if run else lambda: time.time() - t0
  # The EMA teacher is the model when it sets distillation targets; pixel prediction alone
  # trains the student only.
  model_of = "teacher" if distills_from_teacher(recipe) else "student"
  log_every = max(1, min(50, steps // 5))
  try:
    for i in range(start, steps):
      crops = multicrop(
        images(i), np.random.default_rng([seed, 1, i]), patch=cfg.patch_size, recipe=recipe
      )
      state, metrics = step_fn(state, crops, schedule(i, steps, recipe))
      done = i + 1
      if done % log_every == 0 or done == steps:
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          raise FloatingPointError(f"tiny DINO pretraining diverged at step {done} (loss {loss})")
        log.info(
          "tiny DINO pretraining %d/%d loss %.4f (CLS %.4f, dense %.4f, iBOT %.4f, pixels %.4f) "
          "%.0fs",
          done,
          steps,
          loss,
          float(metrics["cls"]),
          float(metrics["dense"]),
          float(metrics["ibot"]),
          float(metrics["pixel"]),
          elapsed(),
        )
      if run is not None and (done % save_every == 0 or done == steps):
        run.save(done, state, loss)
      if evaluate is not None and eval_every > 0 and done % eval_every == 0:
        evaluate(done, jax.device_get(state[model_of]["backbone"]))
  finally:
    if run is not None:
      run.close()
  backbone = jax.device_get(state[model_of]["backbone"])
  return backbone, dict(final_loss=loss, seconds=elapsed(), steps_run=steps - start)


# ---------------------------------------------------------------- attention purity


def patch_segments(masks, patch):
  """uint8 masks [B, H, W] -> [B, N] the most frequent label of each patch (row-major)."""
  b, hh, ww = masks.shape
  h, w = hh // patch, ww // patch
  m = masks[:, : h * patch, : w * patch].reshape(b, h, patch, w, patch).transpose(0, 1, 3, 2, 4)
  m = m.reshape(b, h * w, patch * patch).astype(np.int64)
  counts = (m[..., None] == np.arange(int(m.max()) + 1)).sum(axis=2)
  return counts.argmax(axis=-1)


def attention_purity(attn, segments, *, balanced=False):
  """Mean share of each patch's patch-to-patch attention that lands in its own segment.

  attn: [B, T, T] attention (heads and layers already averaged; token 0 is the CLS and is
  dropped, then each row is renormalised); segments: int [B, N] labels (`patch_segments`).
  balanced: average within each segment of an image first, then over its segments, so that a
  small object counts as much as the background that covers most patches.
  `uniform_purity` gives the chance level (uniform attention).
  """
  a = np.asarray(attn, np.float64)[:, 1:, 1:]
  a = a / a.sum(axis=-1, keepdims=True)
  same = segments[:, :, None] == segments[:, None, :]
  share = (a * same).sum(axis=-1)  # [B, N]
  if not balanced:
    return float(share.mean())
  per_image = [
    np.mean([s[seg == k].mean() for k in np.unique(seg)]) for s, seg in zip(share, segments)
  ]
  return float(np.mean(per_image))


def uniform_purity(segments, *, balanced=False):
  """The purity of uniform attention: the chance level of `attention_purity`."""
  t = segments.shape[1] + 1
  return attention_purity(np.ones((len(segments), t, t)), segments, balanced=balanced)


def dino_attention(model: DINO, params, images, *, batch=64):
  """uint8 images [B, S, S, 3] -> float32 [L, B, T, T]: every layer's attention, heads
  averaged."""
  fn = jax.jit(lambda x: model.apply({"params": params}, normalize(x), method=model.attention_maps))
  out = []
  for i in range(0, len(images), batch):
    a = fn(jnp.asarray(images[i : i + batch], jnp.float32) / 255.0)  # [L, B, heads, T, T]
    out.append(np.asarray(a.mean(axis=2)))
  return np.concatenate(out, axis=1)
