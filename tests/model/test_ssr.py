"""The composed SSR loss on a tiny CLIP: one compilation, finite values, frozen CLIP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from ssr_jax.clip.model import CLIP, CLIPConfig, init_params
from ssr_jax.model.decoder import Decoder
from ssr_jax.model.ssr import build_task

TINY = CLIPConfig(
  embed_dim=16,
  image_size=32,
  patch_size=8,
  vision_width=24,
  vision_layers=4,
  vision_heads=4,
  context_length=8,
  vocab_size=64,
  text_width=16,
  text_layers=1,
  text_heads=2,
)


def _config(cmpa=True, sgc=True, **cam):
  c = base.get_config()
  with c.unlocked():
    c.model.class_names = ("a", "b", "c")
    c.model.bg_names = ("x", "y")
    c.data.num_classes = 4
    c.model.max_classes = 2
    c.model.decoder.embed_dim = 16
    c.model.decoder.num_heads = 2
    c.model.decoder.mlp_dim = 64
    c.model.decoder.num_layers = 1
    c.model.cam.num_attn_layers = 3
    c.model.cam.rfm_layers = 2
    c.model.cam.rfm_switch_step = 2
    c.model.cam.par_dilations = (1, 2)
    c.model.cam.par_iters = 3
    c.model.cmpa.enabled = cmpa
    c.model.cmpa.pixel_weight = 0.5
    c.model.sgc.enabled = sgc
    c.model.sgc.max_superpixels = 16
    c.model.sgc.receiver_mask = True
    c.model.sgc.soft_alpha = 0.7
    c.model.cam.update(cam)
  return c


def _setup(**kw):
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
  task = build_task(c.model, c.loss, clip=clip, num_classes=4)
  rng = np.random.default_rng(0)
  batch = dict(
    image=rng.integers(0, 255, (2, 32, 40, 3), dtype=np.uint8),
    labels=np.array([[1, 0, 1], [0, 0, 0]], np.float32),  # Second image: no labels at all.
    superpixels=np.repeat(np.repeat(rng.integers(-1, 20, (2, 8, 10)), 4, 1), 4, 2),
  )
  params = task.init(k[3], batch)
  return task, frozen, batch, params


@pytest.mark.parametrize("cmpa,sgc", [(True, True), (False, False)])
def test_loss_compiles_once_and_is_finite(cmpa, sgc):
  task, frozen, batch, params = _setup(cmpa=cmpa, sgc=sgc)
  traces = []

  @jax.jit
  def step(params, frozen, batch, step, rng):
    traces.append(1)
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    (loss, metrics), grads = grad_fn(params, frozen, batch, step=step, rng=rng)
    return loss, metrics, grads

  for i in range(4):  # Crosses the RFM switch at step 2 without recompiling.
    loss, metrics, grads = step(params, frozen, batch, jnp.int32(i), jax.random.PRNGKey(i))
    assert np.isfinite(loss)
    assert all(np.isfinite(v) for v in metrics.values())
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  assert len(traces) == 1
  assert ("cmpa" in metrics) == cmpa
  norms = {
    k: sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(v)) for k, v in grads.items()
  }
  assert norms["decoder"] > 0
  if cmpa:
    assert norms["proj"] > 0


def test_frozen_clip_gets_no_gradient():
  task, frozen, batch, params = _setup()

  def loss_wrt_frozen(frozen):
    return task.loss(params, frozen, batch, step=jnp.int32(3), rng=jax.random.PRNGKey(0))[0]

  g = jax.jit(jax.grad(loss_wrt_frozen))(frozen)
  for leaf in jax.tree_util.tree_leaves(g["clip"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_pseudo_labels_only_use_present_classes():
  task, frozen, batch, params = _setup()
  out = jax.jit(task.cam_outputs)(params, frozen, batch)
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
  dec = Decoder(num_classes=4, embed_dim=6, num_layers=1, num_heads=2, mlp_dim=24)
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
