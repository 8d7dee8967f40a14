"""The composed SSR loss on a tiny CLIP: one compilation, finite values, frozen CLIP."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from ssr_jax import resize
from ssr_jax.clip.model import CLIP, init_params
from ssr_jax.clip.preprocess import normalize
from ssr_jax.model import affinity, cam, cmpa, losses, sgc
from ssr_jax.model.decoder import Decoder, ProjectionHead
from ssr_jax.model.ssr import SSROptions, build_task
from ssr_jax.testing import TINY_CLIP, TINY_DINO, random_dino

TINY = TINY_CLIP


def _config(cmpa="clip", sgc=True, fusion=False, dino=False, grouping="superpixels", **cam):
  """cmpa: "clip" (the paper's heads), "decoder" ([v1]) or None (off, frozen-CLIP CAMs); dino:
  DINO attention in the affinity; grouping: SGC's "clusters" (paper) or "superpixels" ([v1])."""
  c = base.get_config()
  c.model.class_names = ("a", "b", "c")
  c.model.bg_names = ("x", "y")
  c.data.num_classes = 4
  c.model.max_classes = 2
  c.model.decoder.embed_dim = 16
  c.model.decoder.num_heads = 2
  c.model.decoder.num_layers = 1
  c.model.cam.num_attn_layers = 3
  c.model.cam.rfm_layers = 2
  c.model.cam.rfm_switch_step = 2
  c.model.cam.par_dilations = (1, 2)
  c.model.cam.par_iters = 3
  c.model.cmpa.enabled = cmpa is not None
  c.model.cmpa.site = cmpa or "clip"
  c.model.cam.source = "cmpa" if cmpa == "clip" else "clip"
  c.model.cmpa.hidden = (8,)
  c.model.cmpa.out_dim = 8
  c.model.cmpa.bank_size = 16
  c.model.cmpa.refresh_every = 2  # Heads' CAMs and the first refresh from step 2.
  c.model.cmpa.decoder.cam_fusion = fusion
  c.model.cmpa.decoder.pixel_weight = 0.5
  c.model.sgc.enabled = sgc
  c.model.sgc.grouping = grouping
  c.model.sgc.max_superpixels = 16
  c.model.sgc.receiver_mask = grouping == "superpixels"
  c.model.sgc.soft_alpha = 0.7 if grouping == "superpixels" else 1.0
  c.model.sgc.ratio_threshold = 0.3
  c.model.cam.dino_weight = 0.6 if dino else 0.0
  c.model.cam.dino_layers = 2
  c.data.color_clusters = 5
  c.model.cam.update(cam)
  return c


def _setup(ignore_label=255, **kw):
  c = _config(**kw)
  clip = CLIP(TINY)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  frozen = dict(
    clip=init_params(clip, k[0]),
    text_fg=jax.random.normal(k[1], (3, 16)),
    text_bg=jax.random.normal(k[2], (2, 16)),
  )
  frozen["text_fg"] /= jnp.linalg.norm(frozen["text_fg"], axis=-1, keepdims=True)
  frozen["text_bg"] /= jnp.linalg.norm(frozen["text_bg"], axis=-1, keepdims=True)
  dino = None
  if c.model.cam.dino_weight > 0:
    dino, frozen["dino"] = random_dino(dataclasses.replace(TINY_DINO, patch_size=TINY.patch_size))
  task = build_task(
    c.model, c.loss, clip=clip, num_classes=4, ignore_label=ignore_label, dino=dino, num_regions=5
  )
  rng = np.random.default_rng(0)
  batch = dict(
    image=rng.integers(0, 255, (2, 32, 40, 3), dtype=np.uint8),
    labels=np.array([[1, 0, 1], [0, 0, 0]], np.float32),  # Second image: no labels at all.
    superpixels=np.repeat(np.repeat(rng.integers(-1, 20, (2, 8, 10)), 4, 1), 4, 2),
    clusters=np.repeat(np.repeat(rng.integers(-1, 5, (2, 8, 10)), 4, 1), 4, 2),
  )
  variables = task.init(k[3], batch)
  return task, frozen, batch, variables


@pytest.mark.parametrize(
  "cmpa,sgc,dino,grouping",
  [
    ("clip", True, True, "clusters"),
    ("decoder", True, False, "superpixels"),
    (None, False, False, "clusters"),
  ],
)
def test_loss_compiles_once_and_is_finite(cmpa, sgc, dino, grouping):
  task, frozen, batch, variables = _setup(cmpa=cmpa, sgc=sgc, dino=dino, grouping=grouping)
  traces = []

  @jax.jit
  def step(variables, frozen, batch, step, rng):
    traces.append(1)

    def fn(p):
      return task.loss({**variables, "params": p}, frozen, batch, step=step, rng=rng)

    (loss, (metrics, coll)), grads = jax.value_and_grad(fn, has_aux=True)(variables["params"])
    return loss, metrics, grads, coll

  for i in range(5):  # Crosses the RFM switch, the heads' CAM start and two bank refreshes.
    loss, metrics, grads, coll = step(variables, frozen, batch, jnp.int32(i), jax.random.PRNGKey(i))
    variables = {**variables, **coll}
    assert np.isfinite(loss)
    assert all(np.isfinite(v) for v in metrics.values())
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  assert len(traces) == 1
  assert ("proto" in metrics) == (cmpa == "clip") and ("cmpa" in metrics) == (cmpa == "decoder")
  norms = {
    k: sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(v)) for k, v in grads.items()
  }
  assert norms["decoder"] > 0
  if cmpa == "decoder":
    assert norms["proj"] > 0
  if cmpa == "clip":
    assert norms["isa"] > 0 and norms["tsa"] > 0 and norms["log_temperature"] > 0
    assert int(variables["bank"]["refreshes"]) == 2  # At steps 2 and 4.
    assert int(variables["bank"]["ptr"]) == 10  # Image 0's two classes, each step.


def test_frozen_clip_gets_no_gradient():
  task, frozen, batch, variables = _setup()

  def loss_wrt_frozen(frozen):
    return task.loss(variables, frozen, batch, step=jnp.int32(3), rng=jax.random.PRNGKey(0))[0]

  g = jax.jit(jax.grad(loss_wrt_frozen))(frozen)
  for leaf in jax.tree_util.tree_leaves(g["clip"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_pseudo_labels_only_use_present_classes():
  task, frozen, batch, variables = _setup()
  out = jax.jit(task.cam_outputs)(variables, frozen, batch)
  labels = np.asarray(out["labels"])
  assert labels.shape == (2, 32, 40)
  assert set(np.unique(labels[0])) <= {0, 1, 3}  # bg + classes a (id 1) and c (id 3).
  np.testing.assert_array_equal(labels[1], 0)  # No labels -> all background.


def test_decoder_param_count_vit_b16():
  # WeCLIP's decoder on ViT-B/16 (11 frozen layers of width 768, 21 classes), method §1.5:
  # 11 * (768*256+256 + 256*256+256) + (2816*256+256) + 3 blocks * 789,760 + (256*21+21).
  dec = Decoder(num_classes=21)
  shapes = jax.eval_shape(
    lambda: dec.init(jax.random.PRNGKey(0), jnp.zeros((11, 1, 400, 768)), train=False)
  )
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  block = 4 * 256 + 256 * 768 + 768 + 256 * 256 + 256 + 256 * 1024 + 1024 + 1024 * 256 + 256
  expected = 11 * (768 * 256 + 256 + 256 * 256 + 256) + 2816 * 256 + 256 + 3 * block + 256 * 21 + 21
  assert block == 789_760
  assert count == expected == 5_985_045


def test_decoder_features_match_per_layer_numpy():
  # F = fuse(concat_l MLP_l(X_l)) with a separate MLP per layer (method §1.5), in numpy.
  rng = np.random.default_rng(3)
  hidden = rng.normal(size=(3, 2, 5, 8)).astype(np.float32)  # [L, B, N, W]
  dec = Decoder(num_classes=4, embed_dim=6, num_layers=1, num_heads=2)
  params = dec.init(jax.random.PRNGKey(0), jnp.asarray(hidden), train=False)["params"]
  _, feats = dec.apply({"params": params}, jnp.asarray(hidden), train=False)
  p = jax.tree.map(np.asarray, params)
  fc1, fc2 = p["mlps"]["fc1"], p["mlps"]["fc2"]
  maps = [
    np.maximum(x @ fc1["kernel"][l] + fc1["bias"][l], 0) @ fc2["kernel"][l] + fc2["bias"][l]
    for l, x in enumerate(hidden)
  ]
  want = np.concatenate(maps, axis=-1) @ p["fuse"]["kernel"] + p["fuse"]["bias"]
  np.testing.assert_allclose(np.asarray(feats), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(fc1["kernel"][0], fc1["kernel"][1])  # Each layer initialised apart.


def _reference_loss(c, clip, frozen, params, batch, *, step, rng, ignore):
  """The loss composed by hand from the pure functions, following method §1.2-1.6, §2 (CMPA with
  the text-driven CAM fusion) and §3 (SGC) rather than SSRTask's code."""
  mc, cc, sc, co = c.model, c.model.cam, c.model.sgc, c.model.cmpa.decoder
  p = TINY.patch_size
  enabled = c.model.cmpa.enabled
  x = normalize(batch["image"], mc.normalization)
  b, hh, ww, _ = x.shape
  out = clip.apply(
    {"params": frozen["clip"]}, x, TINY.vision_layers - 1, method=clip.image_features
  )
  hidden, grid = out["hidden"], out["grid"]
  h, w = grid
  dec = Decoder(num_classes=4, embed_dim=16, num_layers=1, num_heads=2)
  logits, feats = dec.apply(
    {"params": params["decoder"]}, hidden[:, :, 1:], train=True, rngs={"dropout": rng}
  )
  dino = (
    random_dino(dataclasses.replace(TINY_DINO, patch_size=TINY.patch_size))[0]
    if c.model.cam.dino_weight > 0
    else None
  )
  # Only for its GradCAM block wiring and the DINO module.
  task = build_task(mc, c.loss, clip=clip, num_classes=4, dino=dino, num_regions=5)
  cams, ids, valid, attn_last, _ = task.gradcam(
    {"params": params}, frozen, hidden, batch["labels"], grid, heads=False
  )
  z = None
  if enabled:
    z = ProjectionHead(TINY.embed_dim, kind=co.proj).apply({"params": params["proj"]}, feats)
  if enabled and co.cam_fusion and step >= cc.rfm_switch_step:  # §2.7: after the RFM switch.
    text = jnp.take(frozen["text_fg"], ids, axis=0)
    m = jax.nn.relu(jnp.einsum("bnd,bkd->bkn", z, text))
    m = cam.minmax_normalize(m, axes=-1).reshape(cams.shape)
    cams = jnp.where(valid[..., None, None], 0.5 * (cams + m), cams)
  attn = jnp.concatenate([out["attn"], attn_last[None]], axis=0)
  if step >= cc.rfm_switch_step:
    wgt = affinity.rfm_affinity(attn, feats, num_layers=cc.rfm_layers)
  else:
    wgt = affinity.attention_affinity(attn, num_layers=cc.num_attn_layers)
  if cc.dino_weight > 0:  # §3.1: rows normalised, CLIP (or RFM) : DINO = 0.4 : 0.6.
    dino = task.dino
    dx = (batch["image"].astype(np.float32) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225]
    )
    da = dino.apply({"params": frozen["dino"]}, dx, method=dino.attention_maps)  # [L, B, H, T, T]
    wd = da[-cc.dino_layers :, :, :, 1:, 1:].mean(axis=(0, 2))
    wgt = 0.4 * wgt / wgt.sum(-1, keepdims=True) + 0.6 * wd / wd.sum(-1, keepdims=True)
  trans = affinity.transition_matrix(wgt, iters=cc.sinkhorn_iters)
  src = affinity.box_masks(cams, threshold=cc.box_threshold)
  recv = None
  if sc.enabled and sc.grouping == "clusters":  # §3.2-3.3: columns outside target regions.
    member = sgc.region_membership(batch["clusters"], patch_size=p, num_regions=5)
    targets = sgc.target_regions(
      cams, member, high_threshold=sc.high_threshold, ratio_threshold=sc.ratio_threshold
    )
    src = src * sgc.column_mask(targets, member)
  elif sc.enabled:  # [v1]: SGC filters the sources and smooths the transitions.
    member = sgc.membership(
      batch["superpixels"], patch_size=TINY.patch_size, max_superpixels=sc.max_superpixels
    )
    u = sgc.target_masks(cams, member, threshold=sc.threshold, hard=sc.hard)
    src = src * u
    recv = sgc.receiver_masks(u, grid=grid) if sc.receiver_mask else None
    trans = sgc.smooth_affinity(trans, member, alpha=sc.soft_alpha)
  probs = affinity.refine_cams(
    cams, trans, src, out_size=(hh, ww), valid=valid, bg_power=cc.bg_power, recv_masks=recv
  )
  probs = affinity.par(
    x,
    jnp.moveaxis(probs, 1, -1),
    dilations=tuple(cc.par_dilations),
    iters=cc.par_iters,
    w_pos=cc.par_w_pos,
    temp=cc.par_temp,
  )
  labels = affinity.pseudo_labels(probs, ids, valid)
  full = resize.resize(logits.reshape(b, h, w, -1), (hh, ww), "bilinear")
  seg = losses.balanced_ce(full, labels, ignore=ignore)
  small = losses.downsample_labels(labels, (h, w))
  aff = losses.affinity_loss(affinity.feature_affinity(feats), small, radius=c.loss.aff_radius)
  total, terms = c.loss.seg_weight * seg + c.loss.aff_weight * aff, dict(seg=seg, aff=aff)
  if enabled:
    text = cmpa.text_prototypes(frozen["text_fg"], frozen["text_bg"], bg_mode=co.bg_text)
    num_bg = text.shape[0] - frozen["text_fg"].shape[0]
    flat = small.reshape(b, h * w)
    protos, ok = cmpa.prototypes(z, flat, num_classes=4, min_pixels=co.min_pixels)
    terms["cmpa"] = cmpa.cmpa_loss(protos, ok, text, temperature=co.temperature, num_bg=num_bg)
    terms["cmpa_pixel"] = cmpa.pixel_prototype_loss(
      z, flat, text, temperature=co.temperature, num_bg=num_bg
    )
    term = terms["cmpa"] + co.pixel_weight * terms["cmpa_pixel"]
    total = total + float(step >= co.warmup_steps) * co.weight * term
  return total, terms


# ignore_label=0 (background, in every image's pseudo-labels): a loss that ignored 255 instead
# would differ. step 3 is past the RFM switch (decoder features in the affinity).
# The [v1] decoder-side CMPA case adds the text-driven CAM fusion, which needs z in the
# pseudo-labels; the last case is the paper's SGC: DINO attention and colour-region columns,
# before (step 0) and after (step 3) the RFM switch. (CMPA as published: test_cmpa_heads.py.)
@pytest.mark.parametrize(
  "sgc_on,ignore,step,cmpa_on,paper_sgc",
  [
    (False, 255, 0, None, False),
    (False, 0, 3, None, False),
    (True, 0, 3, None, False),
    (False, 255, 3, "decoder", False),
    (True, 255, 0, None, True),
    (True, 0, 3, None, True),
  ],
)
def test_loss_matches_the_pure_functions(sgc_on, ignore, step, cmpa_on, paper_sgc):
  kw = dict(cmpa=cmpa_on, sgc=sgc_on, fusion=cmpa_on is not None, dino=paper_sgc)
  kw["grouping"] = "clusters" if paper_sgc else "superpixels"
  task, frozen, batch, variables = _setup(ignore_label=ignore, **kw)
  c = _config(**kw)
  rng = jax.random.PRNGKey(5)
  got, (got_m, _) = jax.jit(functools.partial(task.loss, step=jnp.int32(step), rng=rng))(
    variables, frozen, batch
  )
  want, want_m = jax.jit(
    functools.partial(_reference_loss, c, task.clip, step=step, rng=rng, ignore=ignore)
  )(frozen, variables["params"], batch)
  assert set(got_m) == set(want_m)
  for k in want_m:
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_options_hash_by_value_and_come_from_the_config():
  c = _config()
  c.model.cam.par_dilations = [1, 2]  # A list in the config becomes a tuple.
  a = SSROptions.from_config(c.model, c.loss, ignore_label=7)
  b = SSROptions.from_config(_config().model, _config().loss, ignore_label=7)
  assert a == b and hash(a) == hash(b)
  assert a.cam.par_dilations == (1, 2) and a.loss.ignore_label == 7 and a.sgc.soft_alpha == 0.7
  t1, _, _, _ = _setup()
  t2, _, _, _ = _setup()
  assert t1 == t2 and hash(t1) == hash(t2)  # Equal tasks share compiled functions.
