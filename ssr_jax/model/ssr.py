"""The composed SSR model: frozen CLIP -> GradCAM -> affinity propagation (+SGC) -> PAR ->
pseudo-labels -> decoder losses (+CMPA). One pure, jittable loss for the train step.

`SSRTask` follows the task protocol of ssr_jax.train: `init(rng, batch)` and
`loss(params, frozen, batch, *, step, rng)`. `frozen` holds what is never trained (CLIP params and
text embeddings); it is passed to the jitted step as a replicated argument.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from ssr_jax import resize as resize_lib
from ssr_jax.clip.model import CLIP
from ssr_jax.clip.preprocess import compute_dtype, normalize
from ssr_jax.model import affinity, cam, cmpa, losses, sgc
from ssr_jax.model.decoder import Decoder, ProjectionHead


def _from_config(cls, cfg, **extra):
  """cls(**fields read from cfg), lists made tuples so that the options hash."""
  values = {}
  for f in dataclasses.fields(cls):
    if f.name in extra:
      continue
    v = cfg[f.name]
    values[f.name] = tuple(v) if isinstance(v, list | tuple) else v
  return cls(**values, **extra)


@dataclasses.dataclass(frozen=True)
class CamOptions:
  """config.model.cam: GradCAM refinement (§1.4); see configs/base.py for each field."""

  num_attn_layers: int
  rfm_layers: int
  rfm_switch_step: int
  sinkhorn_iters: int
  box_threshold: float
  bg_power: float
  par_dilations: tuple[int, ...]
  par_iters: int
  par_w_pos: float
  par_temp: float


@dataclasses.dataclass(frozen=True)
class CMPAOptions:
  """config.model.cmpa: cross-modal prototype alignment (§2)."""

  enabled: bool
  weight: float
  temperature: float
  proj: str
  min_pixels: int
  soft: bool
  bg_text: str
  pixel_weight: float
  warmup_steps: int
  cam_fusion: bool


@dataclasses.dataclass(frozen=True)
class SGCOptions:
  """config.model.sgc: superpixel-guided CAM refinement (§3)."""

  enabled: bool
  threshold: float
  receiver_mask: bool
  soft_alpha: float
  hard: bool
  max_superpixels: int


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """config.loss (§1.6), plus the ignore value of the label maps (config.data.ignore_label)."""

  seg_weight: float
  aff_weight: float
  aff_radius: int
  ignore_label: int = 255


@dataclasses.dataclass(frozen=True)
class SSROptions:
  """Everything SSRTask reads from config.model / config.loss: plain, frozen, hashable."""

  normalization: str  # CLIP input statistics (clip.preprocess.NORMALIZATION key).
  max_classes: int
  logit_scale: float
  cam: CamOptions
  cmpa: CMPAOptions
  sgc: SGCOptions
  loss: LossOptions

  @classmethod
  def from_config(cls, model_cfg, loss_cfg, *, ignore_label: int = 255) -> "SSROptions":
    return cls(
      normalization=str(model_cfg.normalization),
      max_classes=int(model_cfg.max_classes),
      logit_scale=float(model_cfg.logit_scale),
      cam=_from_config(CamOptions, model_cfg.cam),
      cmpa=_from_config(CMPAOptions, model_cfg.cmpa),
      sgc=_from_config(SGCOptions, model_cfg.sgc),
      loss=_from_config(LossOptions, loss_cfg, ignore_label=int(ignore_label)),
    )


@dataclasses.dataclass(frozen=True)
class SSRTask:
  """SSR on a frozen CLIP. Built by `build_task`; holds modules and options, no arrays.

  Compared and hashed by value, so it can be a static jit argument: an equal task reuses the
  compiled functions.
  """

  clip: CLIP
  decoder: Decoder
  proj: ProjectionHead | None
  options: SSROptions
  num_classes: int  # Including background.

  # ------------------------------------------------------------------ frozen CLIP features
  def clip_features(self, frozen, images, *, normalized=False):
    """images uint8/float 0-255 [B, H, W, 3] (or already normalised) -> dict(x normalised,
    hidden [L-1, B, T, W], attn [L-1, B, T, T], grid (h, w)) from the first L-1 blocks (§1.2)."""
    x = images if normalized else normalize(images, self.options.normalization)
    out = self.clip.apply(
      {"params": frozen["clip"]},
      x,
      self.clip.cfg.vision_layers - 1,
      method=self.clip.image_features,
    )
    return dict(
      x=x,
      hidden=jax.lax.stop_gradient(out["hidden"]),
      attn=jax.lax.stop_gradient(out["attn"]),
      grid=out["grid"],
    )

  def decode(self, params, hidden, *, train, rng=None):
    """hidden [L-1, B, T, W] -> (logits [B, N, C], feats [B, N, E])."""
    rngs = {"dropout": rng} if train else {}
    return self.decoder.apply(
      {"params": params["decoder"]}, hidden[:, :, 1:], train=train, rngs=rngs
    )

  def gradcam(self, frozen, hidden, labels, grid):
    """GradCAM through the last block (§1.3). Returns cams [B, K, h, w], ids, valid, attn_last."""
    clip, p = self.clip, {"params": frozen["clip"]}
    x_prev = hidden[-1]
    act = clip.apply(p, x_prev, method=clip.last_block_pre_norm)

    def block_fn(a):
      z, attn = clip.apply(p, x_prev, ln1_out=a, method=clip.last_block)
      # ln_post per patch token, then the patch mean (not CLS), then proj: WeCLIP's order (§1.3).
      return clip.apply(p, z[:, 1:], method=clip.patch_mean_head), attn

    ids, valid = cam.present_classes(labels, max_classes=self.options.max_classes)
    cams, attn_last = cam.gradcam(
      block_fn,
      act,
      ids,
      valid,
      frozen["text_fg"],
      frozen["text_bg"],
      labels,
      logit_scale=self.options.logit_scale,
      grid=grid,
    )
    return cams, ids, valid, jax.lax.stop_gradient(attn_last)

  # ------------------------------------------------------------------ pseudo-labels (§1.4, §3)
  def pseudo_labels(self, frozen, feats_out, labels, superpixels, dec_feats, *, use_rfm, z=None):
    """Online pseudo-labels from frozen features and (detached) decoder features.

    Args:
      feats_out: `clip_features` output; labels [B, C-1]; superpixels [B, H, W] int32 (-1 pad).
      dec_feats: [B, N, E] decoder features F (RFM affinity); use_rfm: bool scalar (traced ok).
      z: optional [B, N, D] CMPA-projected features for the text-driven CAM fusion (§2.7).

    Returns dict(cams [B, K, h, w], ids, valid, probs [B, H, W, 1+K], labels [B, H, W] int32).
    """
    cc = self.options.cam
    x, hidden, grid = feats_out["x"], feats_out["hidden"], feats_out["grid"]
    b, hh, ww, _ = x.shape
    with jax.named_scope("gradcam"):
      cams, ids, valid, attn_last = self.gradcam(frozen, hidden, labels, grid)
    attn = jnp.concatenate([feats_out["attn"], attn_last[None]], axis=0)  # [L, B, T, T]

    dec_feats = jax.lax.stop_gradient(dec_feats)
    if z is not None and self.options.cmpa.cam_fusion:
      text = jnp.take(frozen["text_fg"], ids, axis=0)  # [B, K, D]
      m = jax.nn.relu(jnp.einsum("bnd,bkd->bkn", jax.lax.stop_gradient(z), text))
      m = cam.minmax_normalize(m, axes=-1).reshape(cams.shape)
      cams = jnp.where(use_rfm & valid[..., None, None], 0.5 * (cams + m), cams)

    with jax.named_scope("affinity"):
      w_attn = affinity.attention_affinity(attn, num_layers=cc.num_attn_layers)
      w_rfm = affinity.rfm_affinity(attn, dec_feats, num_layers=cc.rfm_layers)
      w = jnp.where(use_rfm, w_rfm, w_attn)
      trans = affinity.transition_matrix(w, iters=cc.sinkhorn_iters)
    with jax.named_scope("box_masks"):
      src = affinity.box_masks(cams, threshold=cc.box_threshold)
    with jax.named_scope("sgc"):
      trans, src, recv = self._sgc(cams, trans, src, superpixels, grid)
    with jax.named_scope("refine"):
      probs = affinity.refine_cams(
        cams, trans, src, out_size=(hh, ww), valid=valid, bg_power=cc.bg_power, recv_masks=recv
      )  # [B, 1+K, H, W]
      probs = jnp.moveaxis(probs, 1, -1)
    with jax.named_scope("par"):
      probs = affinity.par(
        x,
        probs,
        dilations=cc.par_dilations,
        iters=cc.par_iters,
        w_pos=cc.par_w_pos,
        temp=cc.par_temp,
      )
    plabels = affinity.pseudo_labels(probs, ids, valid)
    out = dict(cams=cams, ids=ids, valid=valid, probs=probs, labels=plabels)
    return jax.tree_util.tree_map(jax.lax.stop_gradient, out)

  def _sgc(self, cams, trans, src, superpixels, grid):
    """SGC (§3): superpixel-filtered source masks, optional receiver masks and smoothed
    affinity. Returns (trans, src, recv or None); the inputs unchanged when SGC is off."""
    sc = self.options.sgc
    recv = None
    if sc.enabled:
      member = sgc.membership(
        superpixels, patch_size=self.clip.cfg.patch_size, max_superpixels=sc.max_superpixels
      )
      u = sgc.target_masks(cams, member, threshold=sc.threshold, hard=sc.hard)
      src = src * u
      if sc.receiver_mask:
        recv = sgc.receiver_masks(u, grid=grid)
      if sc.soft_alpha < 1.0:
        trans = sgc.smooth_affinity(trans, member, alpha=sc.soft_alpha)
    return trans, src, recv

  # ------------------------------------------------------------------ task protocol
  def init(self, rng, batch):
    """Trainable params {decoder, [proj]} for a batch like the training batches."""
    c = self.clip.cfg
    b, hh, ww = batch["image"].shape[:3]
    n = (hh // c.patch_size) * (ww // c.patch_size)
    hidden = jnp.zeros((c.vision_layers - 1, 1, n, c.vision_width), jnp.float32)
    params = {"decoder": self.decoder.init(rng, hidden, train=False)["params"]}
    if self.proj is not None:
      feats = jnp.zeros((1, n, self.decoder.embed_dim), jnp.float32)
      params["proj"] = self.proj.init(rng, feats)["params"]
    return params

  def loss(self, params, frozen, batch, *, step, rng):
    """Total loss and its terms (§1.6, §2.6). Pseudo-labels are stop-gradient."""
    o = self.options
    # Named scopes label the profile (python -m benchmarks train --profile DIR).
    with jax.named_scope("clip"):
      f = self.clip_features(frozen, batch["image"])
    b, hh, ww, _ = f["x"].shape
    h, w = f["grid"]
    with jax.named_scope("decoder"):
      logits, feats = self.decode(params, f["hidden"], train=True, rng=rng)
      z = self.project(params, feats)
    use_rfm = step >= o.cam.rfm_switch_step
    pl = self.pseudo_labels(
      frozen, f, batch["labels"], batch["superpixels"], feats, use_rfm=use_rfm, z=z
    )
    labels = pl["labels"]

    with jax.named_scope("seg_aff_losses"):
      logits_full = resize_lib.resize(logits.reshape(b, h, w, -1), (hh, ww), "bilinear")
      seg = losses.balanced_ce(logits_full, labels, ignore=o.loss.ignore_label)
      attn_pred = affinity.feature_affinity(feats)
      small = losses.downsample_labels(labels, (h, w))
      aff = losses.affinity_loss(attn_pred, small, radius=o.loss.aff_radius)
    total = o.loss.seg_weight * seg + o.loss.aff_weight * aff
    metrics = dict(seg=seg, aff=aff)

    if z is not None:
      with jax.named_scope("cmpa"):
        term, cmpa_metrics = self._cmpa_terms(frozen, z, small, pl)
      on = (step >= o.cmpa.warmup_steps).astype(jnp.float32)
      total = total + on * o.cmpa.weight * term
      metrics.update(cmpa_metrics)
    return total, metrics

  def _cmpa_terms(self, frozen, z, small, pl):
    """CMPA's loss term before warm-up and weight (§2.3-2.5), and its measurements.

    z: [B, N, D] projected features; small: [B, h, w] patch-grid pseudo-labels; pl: the
    `pseudo_labels` output (for soft prototypes). Returns (term scalar, dict(cmpa[, cmpa_pixel])).
    """
    co = self.options.cmpa
    b = z.shape[0]
    text = cmpa.text_prototypes(frozen["text_fg"], frozen["text_bg"], bg_mode=co.bg_text)
    num_bg = text.shape[0] - frozen["text_fg"].shape[0]
    flat = small.reshape(b, -1)
    if co.soft:
      weights = self._soft_weights(pl, small.shape[1:])
      protos, valid = cmpa.soft_prototypes(z, weights, min_weight=co.min_pixels)
    else:
      protos, valid = cmpa.prototypes(
        z, flat, num_classes=self.num_classes, min_pixels=co.min_pixels
      )
    l_align = cmpa.cmpa_loss(protos, valid, text, temperature=co.temperature, num_bg=num_bg)
    term, metrics = l_align, dict(cmpa=l_align)
    if co.pixel_weight > 0:
      l_pix = cmpa.pixel_prototype_loss(z, flat, text, temperature=co.temperature, num_bg=num_bg)
      metrics["cmpa_pixel"] = l_pix
      term = term + co.pixel_weight * l_pix
    return term, metrics

  def _soft_weights(self, pl, grid):
    """Refined probabilities scattered to class slots [B, C, N] for soft prototypes (§2.2)."""
    probs = resize_lib.resize(pl["probs"], grid, "bilinear")  # [B, h, w, 1+K]
    b = probs.shape[0]
    probs = probs.reshape(b, -1, probs.shape[-1])
    slots = jnp.concatenate([jnp.zeros_like(pl["ids"][:, :1]), pl["ids"] + 1], axis=1)
    keep = jnp.concatenate([jnp.ones_like(pl["valid"][:, :1]), pl["valid"]], axis=1)
    onehot = jax.nn.one_hot(slots, self.num_classes) * keep[..., None]  # [B, 1+K, C]
    return jnp.einsum("bnk,bkc->bcn", probs, onehot)

  def project(self, params, feats):
    """CMPA projection z [B, N, D] of decoder features, or None when CMPA is off."""
    if self.proj is None:
      return None
    return self.proj.apply({"params": params["proj"]}, feats)

  # ------------------------------------------------------------------ inference
  def normalized_seg_logits(self, params_and_frozen, x):
    """(params, frozen), normalised images [B, H, W, 3] -> seg logits [B, h, w, C].

    The logits function that evaluation jits as a static argument: unlike a lambda made per
    call, the bound method of one task compares equal at every access, so each size bucket
    compiles once however often evaluation runs.
    """
    params, frozen = params_and_frozen
    return self.seg_logits(params, frozen, x, normalized=True)

  def seg_logits(self, params, frozen, images, *, normalized=False):
    """images 0-255 (or normalised) [B, H, W, 3], sides multiples of the patch -> [B, h, w, C]."""
    f = self.clip_features(frozen, images, normalized=normalized)
    logits, _ = self.decode(params, f["hidden"], train=False)
    return logits.reshape(logits.shape[0], *f["grid"], -1)

  def cam_outputs(self, params, frozen, batch):
    """'val'-mode CAM outputs for pseudo-label quality (RFM affinity, §1.8).

    Returns dict(cams [B, K, h, w], ids, valid, probs [B, H, W, 1+K], labels [B, H, W]).
    """
    f = self.clip_features(frozen, batch["image"])
    _, feats = self.decode(params, f["hidden"], train=False)
    z = self.project(params, feats)
    return self.pseudo_labels(
      frozen, f, batch["labels"], batch["superpixels"], feats, use_rfm=jnp.array(True), z=z
    )


def build_task(
  model_cfg: ml_collections.ConfigDict,
  loss_cfg: ml_collections.ConfigDict,
  *,
  clip: CLIP,
  num_classes: int,
  ignore_label: int = 255,
) -> SSRTask:
  """SSRTask from config.model / config.loss and the (frozen) CLIP module.

  ignore_label: config.data.ignore_label, skipped by the segmentation loss.
  """
  dtype = compute_dtype(model_cfg.dtype)
  if len(model_cfg.class_names) != num_classes - 1:
    raise ValueError(
      f"model.class_names has {len(model_cfg.class_names)} names but data.num_classes="
      f"{num_classes} (background included): set them consistently"
    )
  options = SSROptions.from_config(model_cfg, loss_cfg, ignore_label=ignore_label)
  layers = clip.cfg.vision_layers
  for key in ("num_attn_layers", "rfm_layers"):
    if not 1 <= getattr(options.cam, key) <= layers:
      raise ValueError(f"model.cam.{key}={getattr(options.cam, key)} must be in [1, {layers}]")
  d = model_cfg.decoder
  decoder = Decoder(
    num_classes=num_classes,
    embed_dim=d.embed_dim,
    num_layers=d.num_layers,
    num_heads=d.num_heads,
    dropout=d.dropout,
    dtype=dtype,
  )
  proj = None
  if options.cmpa.enabled:
    proj = ProjectionHead(clip.cfg.embed_dim, kind=options.cmpa.proj, dtype=dtype)
  return SSRTask(clip, decoder, proj, options, num_classes)
