"""The composed SSR model: frozen CLIP -> GradCAM (through CMPA's heads) -> affinity propagation
(+SGC) -> PAR -> pseudo-labels -> decoder losses + CMPA's prototype loss. One pure, jittable loss
for the train step.

`SSRTask` follows the task protocol of ssr_jax.train: `init(rng, batch) -> variables` and
`loss(variables, frozen, batch, *, step, rng) -> (loss, (metrics, collections))`. `variables` is
Flax's dict: "params" (trainable: the decoder, CMPA's ISA/TSA heads and log-temperature) plus
the mutable collections "batch_stats" (the heads' BatchNorm) and "bank" (CMPA's prototype bank).
`frozen` holds what is never trained (CLIP params and text embeddings); it is passed to the
jitted step as a replicated argument.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from ssr_jax import resize as resize_lib
from ssr_jax.clip.model import CLIP
from ssr_jax.clip.preprocess import compute_dtype, normalize
from ssr_jax.dino import model as dino_lib
from ssr_jax.model import affinity, cam, cmpa, losses, sgc
from ssr_jax.model import prototypes as protos_lib
from ssr_jax.model.decoder import Decoder, ProjectionHead
from ssr_jax.model.heads import AlignmentHead

CAM_SOURCES = ("cmpa", "clip")
CMPA_SITES = ("clip", "decoder")
POSITIVES = ("cluster", "class")
CONTRASTS = ("cross", "intra")
CAM_POOLINGS = ("tokens", "pooled")
SGC_GROUPINGS = ("clusters", "superpixels")


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
  """config.model.cam: GradCAM and its refinement (§1.3-1.4); see configs/base.py."""

  source: str
  dino_weight: float
  dino_layers: int
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
class DecoderCMPAOptions:
  """config.model.cmpa.decoder: the [v1] decoder-side CMPA (§2.7), used when site="decoder"."""

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
class CMPAOptions:
  """config.model.cmpa: cross-modal prototype alignment (§2)."""

  enabled: bool
  site: str
  hidden: tuple[int, ...]
  out_dim: int
  bn_momentum: float
  weight: float
  temperature: float
  refresh_every: int
  bank_size: int
  kmeans_iters: int
  positive: str
  symmetric_weight: float
  contrast: str
  cam_pooling: str
  cam_start_step: int
  cam_scale: float
  decoder: DecoderCMPAOptions

  @property
  def heads(self) -> bool:
    """Whether the paper's ISA/TSA heads on CLIP's features exist (site "clip")."""
    return self.enabled and self.site == "clip"


@dataclasses.dataclass(frozen=True)
class SGCOptions:
  """config.model.sgc: superpixel-guided CAM refinement (§3), plus the number of colour
  regions per image (config.data.color_clusters)."""

  enabled: bool
  grouping: str
  high_threshold: float
  ratio_threshold: float
  replace_box: bool
  threshold: float
  receiver_mask: bool
  soft_alpha: float
  hard: bool
  max_superpixels: int
  num_regions: int = 8


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
  def from_config(
    cls, model_cfg, loss_cfg, *, ignore_label: int = 255, num_regions: int = 8
  ) -> "SSROptions":
    return cls(
      normalization=str(model_cfg.normalization),
      max_classes=int(model_cfg.max_classes),
      logit_scale=float(model_cfg.logit_scale),
      cam=_from_config(CamOptions, model_cfg.cam),
      cmpa=_from_config(
        CMPAOptions,
        model_cfg.cmpa,
        decoder=_from_config(DecoderCMPAOptions, model_cfg.cmpa.decoder),
      ),
      sgc=_from_config(SGCOptions, model_cfg.sgc, num_regions=int(num_regions)),
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
  proj: ProjectionHead | None  # [v1] decoder-side CMPA projection (site "decoder").
  isa: AlignmentHead | None  # CMPA's image head (site "clip").
  tsa: AlignmentHead | None  # CMPA's text head.
  dino: dino_lib.DINO | None  # Frozen DINO whose attention joins the affinity (§3.1).
  options: SSROptions
  num_classes: int  # Including background.

  # Collections of `variables` that inference needs (the bank is for training only).
  inference_collections = ("batch_stats",)

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

  def dino_attention(self, frozen, images):
    """Frozen DINO's head-averaged attention of every layer [L, B, T, T] for uint8/float 0-255
    images [B, H, W, 3] (ImageNet statistics, as DINO was trained), or None without DINO."""
    if self.dino is None:
      return None
    x = dino_lib.normalize(images.astype(jnp.float32) / 255.0)
    attn = self.dino.apply({"params": frozen["dino"]}, x, method=self.dino.attention_maps)
    return jax.lax.stop_gradient(attn.mean(axis=2))

  def decode(self, params, hidden, *, train, rng=None):
    """hidden [L-1, B, T, W] -> (logits [B, N, C], feats [B, N, E])."""
    rngs = {"dropout": rng} if train else {}
    return self.decoder.apply(
      {"params": params["decoder"]}, hidden[:, :, 1:], train=train, rngs=rngs
    )

  # ------------------------------------------------------------------ CMPA heads (§2.1)
  def head(self, name, variables, x, *, train):
    """ISA or TSA (`name` "isa" / "tsa") on x [..., D] -> [..., d2].

    train=True uses (and returns updated) batch statistics: returns (out, new batch_stats);
    train=False uses the running averages, with the parameters' gradient stopped (the CAM path
    is a target, not a term of the loss): returns out.
    """
    module = self.isa if name == "isa" else self.tsa
    v = {"params": variables["params"][name], "batch_stats": variables["batch_stats"][name]}
    if train:
      out, updated = module.apply(v, x, train=True, mutable=["batch_stats"])
      return out, updated["batch_stats"]
    return module.apply(jax.lax.stop_gradient(v), x, train=False)

  def dense_features(self, frozen, tokens):
    """CLIP's dense visual features v: ln_post + proj of the last block's patch tokens
    [B, N, W] -> [B, N, D] (gradient stopped: CLIP is frozen)."""
    p = {"params": frozen["clip"]}
    v = self.clip.apply(p, tokens, method=self.clip.token_features)
    return jax.lax.stop_gradient(v)

  # ------------------------------------------------------------------ GradCAM (§1.3, §2.2)
  def gradcam(self, variables, frozen, hidden, labels, grid, *, heads):
    """GradCAM through the last block, with the logits of frozen CLIP or of CMPA's heads.

    heads: bool, python or traced (a traced one selects with lax.cond: one compiled step runs
      either). Through the heads (§2.2), the image feature is ISA of the dense features
      (cmpa.cam_pooling "tokens": ISA on every patch token, then the mean; "pooled": ISA of
      WeCLIP's pooled feature), the text features are TSA of the fg and bg prompts, both with
      the running BatchNorm statistics, and the softmax scale is cmpa.cam_scale (0 = 1/tau,
      the learned temperature, as CLIP's own scale is its learned one).

    Returns cams [B, K, h, w], ids, valid, attn_last [B, T, T], tokens [B, N, W] (the last
    block's patch tokens, for the dense features).
    """
    clip, p = self.clip, {"params": frozen["clip"]}
    x_prev = hidden[-1]
    act = clip.apply(p, x_prev, method=clip.last_block_pre_norm)
    ids, valid = cam.present_classes(labels, max_classes=self.options.max_classes)

    def run(block_head, text_fg, text_bg, scale):
      def block_fn(a):
        z, attn = clip.apply(p, x_prev, ln1_out=a, method=clip.last_block)
        return block_head(z[:, 1:]), (attn, z[:, 1:])

      return cam.gradcam(
        block_fn, act, ids, valid, text_fg, text_bg, labels, logit_scale=scale, grid=grid
      )

    def via_clip(_):
      # ln_post per patch token, then the patch mean (not CLS), then proj: WeCLIP's order (§1.3).
      head = lambda t: clip.apply(p, t, method=clip.patch_mean_head)  # noqa: E731
      return run(head, frozen["text_fg"], frozen["text_bg"], self.options.logit_scale)

    def via_heads(_):
      co = self.options.cmpa
      n_fg = frozen["text_fg"].shape[0]
      text = self.head(
        "tsa", variables, jnp.concatenate([frozen["text_fg"], frozen["text_bg"]]), train=False
      )

      def head(t):
        if co.cam_pooling == "tokens":
          v = clip.apply(p, t, method=clip.token_features)
          return self.head("isa", variables, v, train=False).mean(axis=-2)
        return self.head(
          "isa", variables, clip.apply(p, t, method=clip.patch_mean_head), train=False
        )

      scale = co.cam_scale or jnp.exp(
        -jax.lax.stop_gradient(variables["params"]["log_temperature"])
      )
      return run(head, text[:n_fg], text[n_fg:], scale)

    if not self.options.cmpa.heads or heads is False:
      out = via_clip(None)
    elif heads is True:
      out = via_heads(None)
    else:
      out = jax.lax.cond(heads, via_heads, via_clip, None)
    cams, (attn_last, tokens) = out
    return cams, ids, valid, jax.lax.stop_gradient(attn_last), jax.lax.stop_gradient(tokens)

  # ------------------------------------------------------------------ pseudo-labels (§1.4, §3)
  def pseudo_labels(
    self, variables, frozen, feats_out, batch, dec_feats, *, use_rfm, heads, z=None
  ):
    """Online pseudo-labels from frozen features and (detached) decoder features.

    Args:
      variables: the task's variables (the heads' params and batch_stats for heads CAMs).
      feats_out: `clip_features` output, plus "dino_attn" [L', B, T, T] (`dino_attention`) when
        DINO joins the affinity.
      batch: labels [B, C-1]; superpixels [B, H, W] int32 (-1 pad) for the v1 SGC; clusters
        [B, H, W] int32 (-1 pad) colour regions for the paper's SGC.
      dec_feats: [B, N, E] decoder features F (RFM affinity); use_rfm: bool scalar (traced ok).
      heads: GradCAM through CMPA's heads (python or traced bool), see `gradcam`.
      z: optional [B, N, D] [v1] decoder-side CMPA features for the text-driven CAM fusion.

    Returns dict(cams [B, K, h, w], ids, valid, probs [B, H, W, 1+K], labels [B, H, W] int32,
    tokens [B, N, W] the last block's patch tokens).
    """
    cc = self.options.cam
    x, hidden, grid = feats_out["x"], feats_out["hidden"], feats_out["grid"]
    b, hh, ww, _ = x.shape
    with jax.named_scope("gradcam"):
      cams, ids, valid, attn_last, tokens = self.gradcam(
        variables, frozen, hidden, batch["labels"], grid, heads=heads
      )
    attn = jnp.concatenate([feats_out["attn"], attn_last[None]], axis=0)  # [L, B, T, T]

    dec_feats = jax.lax.stop_gradient(dec_feats)
    if z is not None and self.options.cmpa.decoder.cam_fusion:
      text = jnp.take(frozen["text_fg"], ids, axis=0)  # [B, K, D]
      m = jax.nn.relu(jnp.einsum("bnd,bkd->bkn", jax.lax.stop_gradient(z), text))
      m = cam.minmax_normalize(m, axes=-1).reshape(cams.shape)
      cams = jnp.where(use_rfm & valid[..., None, None], 0.5 * (cams + m), cams)

    with jax.named_scope("affinity"):
      w_attn = affinity.attention_affinity(attn, num_layers=cc.num_attn_layers)
      w_rfm = affinity.rfm_affinity(attn, dec_feats, num_layers=cc.rfm_layers)
      w = jnp.where(use_rfm, w_rfm, w_attn)
      if cc.dino_weight > 0:  # CLIP (or, after the switch, RFM) : DINO, §3.1.
        w_dino = affinity.attention_affinity(feats_out["dino_attn"], num_layers=cc.dino_layers)
        w = affinity.fuse_affinities(w, w_dino, dino_weight=cc.dino_weight)
      trans = affinity.transition_matrix(w, iters=cc.sinkhorn_iters)
    with jax.named_scope("box_masks"):
      src = affinity.box_masks(cams, threshold=cc.box_threshold)
    with jax.named_scope("sgc"):
      trans, src, recv = self._sgc(cams, trans, src, batch, grid)
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
    out = dict(cams=cams, ids=ids, valid=valid, probs=probs, labels=plabels, tokens=tokens)
    return jax.tree_util.tree_map(jax.lax.stop_gradient, out)

  def _sgc(self, cams, trans, src, batch, grid):
    """SGC (§3). grouping "clusters" (the paper's): target colour regions per class, whose
    patches are the affinity's only source columns, within the box mask (or replacing it).
    grouping "superpixels" ([v1]): superpixel-filtered source masks, optional receiver masks and
    smoothed affinity. Returns (trans, src, recv or None); the inputs unchanged when SGC is off."""
    sc = self.options.sgc
    p = self.clip.cfg.patch_size
    recv = None
    if sc.enabled and sc.grouping == "clusters":
      member = sgc.region_membership(batch["clusters"], patch_size=p, num_regions=sc.num_regions)
      targets = sgc.target_regions(
        cams, member, high_threshold=sc.high_threshold, ratio_threshold=sc.ratio_threshold
      )
      column = sgc.column_mask(targets, member, hard=sc.hard)
      src = sgc.source_masks(src, column, replace_box=sc.replace_box)
    elif sc.enabled:
      member = sgc.membership(
        batch["superpixels"], patch_size=p, max_superpixels=sc.max_superpixels
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
    """Variables {params: {decoder, [isa, tsa, log_temperature], [proj]}, [batch_stats, bank]}
    for a batch like the training batches."""
    c, co = self.clip.cfg, self.options.cmpa
    b, hh, ww = batch["image"].shape[:3]
    n = (hh // c.patch_size) * (ww // c.patch_size)
    hidden = jnp.zeros((c.vision_layers - 1, 1, n, c.vision_width), jnp.float32)
    params = {"decoder": self.decoder.init(rng, hidden, train=False)["params"]}
    variables = {}
    if co.heads:
      x = jnp.zeros((2, c.embed_dim), jnp.float32)
      isa = self.isa.init(jax.random.fold_in(rng, 1), x, train=False)
      tsa = self.tsa.init(jax.random.fold_in(rng, 2), x, train=False)
      params.update(
        isa=isa["params"],
        tsa=tsa["params"],
        log_temperature=protos_lib.init_log_temperature(co.temperature),
      )
      variables["batch_stats"] = {"isa": isa["batch_stats"], "tsa": tsa["batch_stats"]}
      variables["bank"] = protos_lib.init_bank(co.bank_size, co.out_dim, self.num_classes - 1)
    if self.proj is not None:
      feats = jnp.zeros((1, n, self.decoder.embed_dim), jnp.float32)
      params["proj"] = self.proj.init(rng, feats)["params"]
    return {"params": params, **variables}

  def derived(self, variables) -> dict:
    """Values computed from the variables that must stay finite (the train step's NaN guard):
    CMPA's tau = exp(log_temperature), inf from log_temperature ~88.7 on (float32) while that
    parameter itself is still finite. {} without CMPA's heads."""
    if "log_temperature" not in variables["params"]:
      return {}
    return {"tau": jnp.exp(variables["params"]["log_temperature"])}

  def loss(self, variables, frozen, batch, *, step, rng):
    """Total loss, its terms and the updated collections (§1.6, §2.5). Pseudo-labels are
    stop-gradient. Returns (loss, (metrics, collections))."""
    o = self.options
    params = variables["params"]
    # Named scopes label the profile (python -m benchmarks train --profile DIR).
    with jax.named_scope("clip"):
      f = self.clip_features(frozen, batch["image"])
    with jax.named_scope("dino"):
      f["dino_attn"] = self.dino_attention(frozen, batch["image"])
    b, hh, ww, _ = f["x"].shape
    h, w = f["grid"]
    with jax.named_scope("decoder"):
      logits, feats = self.decode(params, f["hidden"], train=True, rng=rng)
      z = self.project(params, feats)
    use_rfm = step >= o.cam.rfm_switch_step
    # Untrained heads give meaningless CAMs: frozen CLIP's until cmpa.cam_start_step (§2.2).
    heads = (step >= o.cmpa.cam_start_step) if o.cam.source == "cmpa" else False
    pl = self.pseudo_labels(variables, frozen, f, batch, feats, use_rfm=use_rfm, heads=heads, z=z)
    labels = pl["labels"]

    with jax.named_scope("seg_aff_losses"):
      logits_full = resize_lib.resize(logits.reshape(b, h, w, -1), (hh, ww), "bilinear")
      seg = losses.balanced_ce(logits_full, labels, ignore=o.loss.ignore_label)
      attn_pred = affinity.feature_affinity(feats)
      small = losses.downsample_labels(labels, (h, w))
      aff = losses.affinity_loss(attn_pred, small, radius=o.loss.aff_radius)
    total = o.loss.seg_weight * seg + o.loss.aff_weight * aff
    metrics = dict(seg=seg, aff=aff)
    collections = {k: v for k, v in variables.items() if k != "params"}

    if o.cmpa.heads:
      with jax.named_scope("cmpa"):
        term, cmpa_metrics, collections = self._prototype_terms(variables, frozen, pl, step)
      total = total + o.cmpa.weight * term
      metrics.update(cmpa_metrics)
    elif z is not None:
      with jax.named_scope("cmpa"):
        term, cmpa_metrics = self._cmpa_terms(frozen, z, small, pl)
      dco = o.cmpa.decoder
      on = (step >= dco.warmup_steps).astype(jnp.float32)
      total = total + on * dco.weight * term
      metrics.update(cmpa_metrics)
    return total, (metrics, collections)

  def _prototype_terms(self, variables, frozen, pl, step):
    """CMPA as published (§2.3-2.5): class features through the heads, the bank and L_proto.

    pl: the `pseudo_labels` output (its CAMs weight the pooling, its tokens give v). The bank
    is refreshed (K-means) at every multiple of cmpa.refresh_every, from the samples of the
    steps before; until the first refresh the prototypes are TSA(t) and the positive is the
    class (no clusters exist yet). Returns (L_proto, metrics, updated collections).
    """
    co = self.options.cmpa
    params = variables["params"]
    ids, valid = pl["ids"], pl["valid"]
    v = self.dense_features(frozen, pl["tokens"])
    v_img, bs_isa = self.head("isa", variables, v, train=True)  # [B, N, d2]
    n_fg = frozen["text_fg"].shape[0]
    text = jnp.concatenate([frozen["text_fg"], frozen["text_bg"]])
    t_all, bs_tsa = self.head("tsa", variables, text, train=True)
    t_fg = t_all[:n_fg]
    f_image = protos_lib.cam_weighted_pool(v_img, pl["cams"], valid)  # [B, K, d2]
    f_text = jnp.take(t_fg, ids, axis=0)  # [B, K, d2]

    bank = variables["bank"]
    live = jax.lax.stop_gradient(t_fg)
    fresh = bank["refreshes"] == 0
    bank = dict(
      bank,
      image_protos=jnp.where(fresh, live, bank["image_protos"]),
      text_protos=jnp.where(fresh, live, bank["text_protos"]),
    )
    refresh = (step > 0) & (step % co.refresh_every == 0)
    bank = jax.lax.cond(
      refresh,
      lambda bk: protos_lib.bank_refresh(bk, iters=co.kmeans_iters),
      lambda bk: bk,
      bank,
    )
    p_i, p_t = bank["image_protos"], bank["text_protos"]
    ready = bank["refreshes"] > 0
    img_cluster = protos_lib.nearest_prototype(jax.lax.stop_gradient(f_image), p_i)
    txt_cluster = protos_lib.nearest_prototype(live[ids], p_t)
    if co.positive == "cluster":
      img_target = jnp.where(ready, img_cluster, ids)
      txt_target = jnp.where(ready, txt_cluster, ids)
    else:
      img_target, txt_target = ids, ids
    # Cross-modal (Eq. 6): image features against P_T, the symmetric term text against P_I.
    # Intra-modal (Table 4's ablation row): each modality against its own prototypes.
    against_image, against_text = (p_t, p_i) if co.contrast == "cross" else (p_i, p_t)
    loss = protos_lib.cmpa_prototype_loss(
      f_image,
      img_target,
      valid,
      against_image,
      log_temperature=params["log_temperature"],
      f_text=f_text,
      text_targets=txt_target,
      text_valid=valid,
      image_prototypes=against_text,
      symmetric_weight=co.symmetric_weight,
    )
    bank = protos_lib.bank_push(bank, jax.lax.stop_gradient(f_image), live[ids], ids, valid)
    n_valid = jnp.maximum(valid.sum(), 1)
    metrics = dict(
      proto=loss,
      tau=self.derived(variables)["tau"],
      # Share of the batch's (image, class) samples whose nearest image prototype is their class.
      cluster_agree=jnp.sum((img_cluster == ids) & valid) / n_valid,
    )
    collections = {"batch_stats": {"isa": bs_isa, "tsa": bs_tsa}, "bank": bank}
    return loss, metrics, collections

  def _cmpa_terms(self, frozen, z, small, pl):
    """[v1] decoder-side CMPA's loss term before warm-up and weight (§2.7), and its metrics.

    z: [B, N, D] projected features; small: [B, h, w] patch-grid pseudo-labels; pl: the
    `pseudo_labels` output (for soft prototypes). Returns (term scalar, dict(cmpa[, cmpa_pixel])).
    """
    co = self.options.cmpa.decoder
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
    """Refined probabilities scattered to class slots [B, C, N] for soft prototypes (§2.7)."""
    probs = resize_lib.resize(pl["probs"], grid, "bilinear")  # [B, h, w, 1+K]
    b = probs.shape[0]
    probs = probs.reshape(b, -1, probs.shape[-1])
    slots = jnp.concatenate([jnp.zeros_like(pl["ids"][:, :1]), pl["ids"] + 1], axis=1)
    keep = jnp.concatenate([jnp.ones_like(pl["valid"][:, :1]), pl["valid"]], axis=1)
    onehot = jax.nn.one_hot(slots, self.num_classes) * keep[..., None]  # [B, 1+K, C]
    return jnp.einsum("bnk,bkc->bcn", probs, onehot)

  def project(self, params, feats):
    """[v1] CMPA projection z [B, N, D] of decoder features, or None without it."""
    if self.proj is None:
      return None
    return self.proj.apply({"params": params["proj"]}, feats)

  # ------------------------------------------------------------------ inference
  def normalized_seg_logits(self, variables_and_frozen, x):
    """(variables, frozen), normalised images [B, H, W, 3] -> seg logits [B, h, w, C].

    The logits function that evaluation jits as a static argument: unlike a lambda made per
    call, the bound method of one task compares equal at every access, so each size bucket
    compiles once however often evaluation runs.
    """
    variables, frozen = variables_and_frozen
    return self.seg_logits(variables, frozen, x, normalized=True)

  def seg_logits(self, variables, frozen, images, *, normalized=False):
    """images 0-255 (or normalised) [B, H, W, 3], sides multiples of the patch -> [B, h, w, C]."""
    f = self.clip_features(frozen, images, normalized=normalized)
    logits, _ = self.decode(variables["params"], f["hidden"], train=False)
    return logits.reshape(logits.shape[0], *f["grid"], -1)

  def cam_outputs(self, variables, frozen, batch, *, source=None):
    """'val'-mode CAM outputs for pseudo-label quality (RFM affinity, §1.8).

    source: "cmpa" or "clip" GradCAM logits; None = model.cam.source (a trained model's heads).
    Returns dict(cams [B, K, h, w], ids, valid, probs [B, H, W, 1+K], labels [B, H, W], tokens).
    """
    source = self.options.cam.source if source is None else source
    if source not in CAM_SOURCES or (source == "cmpa" and not self.options.cmpa.heads):
      raise ValueError(
        f"CAM source {source!r}: use one of {CAM_SOURCES}; 'cmpa' needs model.cmpa.enabled and "
        "model.cmpa.site='clip'"
      )
    params = variables["params"]
    f = self.clip_features(frozen, batch["image"])
    f["dino_attn"] = self.dino_attention(frozen, batch["image"])
    _, feats = self.decode(params, f["hidden"], train=False)
    z = self.project(params, feats)
    return self.pseudo_labels(
      variables, frozen, f, batch, feats, use_rfm=jnp.array(True), heads=source == "cmpa", z=z
    )


def sgc_inputs(enabled: bool, grouping: str) -> dict:
  """What SGC reads from the data (the input pipelines' flags): superpixels for the [v1]
  grouping, colour clusters for the paper's."""
  return dict(
    superpixels=enabled and grouping == "superpixels", clusters=enabled and grouping == "clusters"
  )


def _choice(key, value, allowed):
  if value not in allowed:
    raise ValueError(f"{key}={value!r}: use one of {allowed}")


def build_task(
  model_cfg: ml_collections.ConfigDict,
  loss_cfg: ml_collections.ConfigDict,
  *,
  clip: CLIP,
  num_classes: int,
  ignore_label: int = 255,
  dino: dino_lib.DINO | None = None,
  num_regions: int = 8,
) -> SSRTask:
  """SSRTask from config.model / config.loss and the frozen CLIP (and DINO) modules.

  ignore_label: config.data.ignore_label, skipped by the segmentation loss. dino: the frozen
  DINO whose attention joins the affinity (model.cam.dino_weight > 0). num_regions:
  config.data.color_clusters, the colour regions per image of the paper's SGC.
  """
  dtype = compute_dtype(model_cfg.dtype)
  if len(model_cfg.class_names) != num_classes - 1:
    raise ValueError(
      f"model.class_names has {len(model_cfg.class_names)} names but data.num_classes="
      f"{num_classes} (background included): set them consistently"
    )
  options = SSROptions.from_config(
    model_cfg, loss_cfg, ignore_label=ignore_label, num_regions=num_regions
  )
  layers = clip.cfg.vision_layers
  for key in ("num_attn_layers", "rfm_layers"):
    if not 1 <= getattr(options.cam, key) <= layers:
      raise ValueError(f"model.cam.{key}={getattr(options.cam, key)} must be in [1, {layers}]")
  co = options.cmpa
  _choice("model.cam.source", options.cam.source, CAM_SOURCES)
  _choice("model.cmpa.site", co.site, CMPA_SITES)
  _choice("model.cmpa.positive", co.positive, POSITIVES)
  _choice("model.cmpa.contrast", co.contrast, CONTRASTS)
  _choice("model.cmpa.cam_pooling", co.cam_pooling, CAM_POOLINGS)
  _check_sgc_and_dino(options, clip, dino)
  if options.cam.source == "cmpa" and not co.heads:
    raise ValueError(
      f"model.cam.source='cmpa' computes CAMs through CMPA's heads, but model.cmpa.enabled="
      f"{co.enabled} and model.cmpa.site={co.site!r}: set model.cam.source='clip' (frozen CLIP "
      "CAMs), or enable CMPA with site 'clip'"
    )
  if co.heads:
    for key in ("refresh_every", "bank_size", "out_dim"):
      if getattr(co, key) <= 0:
        raise ValueError(f"model.cmpa.{key}={getattr(co, key)}: must be positive")
  d = model_cfg.decoder
  decoder = Decoder(
    num_classes=num_classes,
    embed_dim=d.embed_dim,
    num_layers=d.num_layers,
    num_heads=d.num_heads,
    dropout=d.dropout,
    dtype=dtype,
  )
  proj = isa = tsa = None
  if co.enabled and co.site == "decoder":
    proj = ProjectionHead(clip.cfg.embed_dim, kind=co.decoder.proj, dtype=dtype)
  if co.heads:
    isa, tsa = (
      AlignmentHead(co.hidden, co.out_dim, momentum=co.bn_momentum, dtype=dtype) for _ in "it"
    )
  return SSRTask(clip, decoder, proj, isa, tsa, dino, options, num_classes)


def _check_sgc_and_dino(options, clip, dino):
  """Start-up errors for SGC / DINO settings the step cannot run with (named config keys)."""
  cc, sc = options.cam, options.sgc
  _choice("model.sgc.grouping", sc.grouping, SGC_GROUPINGS)
  if not 0.0 <= cc.dino_weight <= 1.0:
    raise ValueError(f"model.cam.dino_weight={cc.dino_weight}: must be in [0, 1]")
  if cc.dino_weight > 0 and dino is None:
    raise ValueError(
      f"model.cam.dino_weight={cc.dino_weight} fuses DINO attention into the affinity (the "
      "paper's SGC) but no DINO is loaded: pass --config.dino.weights=/path/to/dino-vits16 (a "
      "local Hugging Face directory or dino_deitsmall16_pretrain.pth), or set "
      "--config.model.cam.dino_weight=0 for CLIP attention alone"
    )
  if dino is not None:
    if dino.cfg.patch_size != clip.cfg.patch_size:
      raise ValueError(
        f"DINO patch size {dino.cfg.patch_size} differs from CLIP's {clip.cfg.patch_size}: their "
        "attention maps must share the patch grid (use ViT-S/16 or ViT-B/16 with CLIP ViT-B/16)"
      )
    if not 1 <= cc.dino_layers <= dino.cfg.layers:
      raise ValueError(f"model.cam.dino_layers={cc.dino_layers} must be in [1, {dino.cfg.layers}]")
  if sc.enabled and sc.grouping == "clusters" and (sc.receiver_mask or sc.soft_alpha < 1.0):
    raise ValueError(
      "model.sgc.receiver_mask / soft_alpha are [v1] options of model.sgc.grouping='superpixels'; "
      "with 'clusters' set receiver_mask=False and soft_alpha=1.0"
    )
