"""GradCAM against finite differences of the same CLIP score (method §1.3)."""

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax.clip.model import CLIP, CLIPConfig, init_params
from ssr_jax.model import cam

CFG = CLIPConfig(
  embed_dim=16,
  image_size=32,
  patch_size=8,
  vision_width=24,
  vision_layers=3,
  vision_heads=4,
  context_length=8,
  vocab_size=64,
  text_width=16,
  text_layers=1,
  text_heads=2,
)


def _setup():
  model = CLIP(CFG)
  params = init_params(model, jax.random.PRNGKey(0))
  p = {"params": params}
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 40, 3))
  out = model.apply(p, images, 2, method=model.image_features)
  x_prev = out["hidden"][-1]
  act = model.apply(p, x_prev, method=model.last_block_pre_norm)

  def block_fn(a):
    z, attn = model.apply(p, x_prev, ln1_out=a, method=model.last_block)
    return model.apply(p, z[:, 1:].mean(axis=1), method=model.visual_head), attn

  k = jax.random.split(jax.random.PRNGKey(2), 2)
  t_fg = jax.random.normal(k[0], (5, 16))
  t_bg = jax.random.normal(k[1], (3, 16))
  t_fg /= jnp.linalg.norm(t_fg, axis=-1, keepdims=True)
  t_bg /= jnp.linalg.norm(t_bg, axis=-1, keepdims=True)
  labels = jnp.array([[1, 0, 1, 0, 1], [0, 1, 0, 0, 0]], jnp.float32)
  return block_fn, act, t_fg, t_bg, labels, out["grid"]


def test_present_classes_pads_in_order():
  labels = jnp.array([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
  ids, valid = cam.present_classes(labels, max_classes=3)
  np.testing.assert_array_equal(ids, [[1, 3, 4], [0, 0, 0], [0, 1, 2]])
  np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 0, 0], [1, 1, 1]])


def test_gradcam_matches_finite_differences():
  # logit_scale 10 (not CLIP's 100) keeps the softmax unsaturated, so float32 finite
  # differences are accurate to ~1e-4.
  block_fn, act, t_fg, t_bg, labels, grid = _setup()
  ids, valid = cam.present_classes(labels, max_classes=3)
  cams, _ = jax.jit(
    lambda a: cam.gradcam(block_fn, a, ids, valid, t_fg, t_bg, labels, logit_scale=10.0, grid=grid)
  )(act)
  assert cams.shape == (2, 3, 4, 5)

  score = jax.jit(
    lambda a, b, c: cam.clip_scores(block_fn(a)[0], t_fg, t_bg, labels, logit_scale=10.0)[b, c]
  )

  def deriv(d, b, c, h):
    return (score(act + h * d, b, c) - score(act - h * d, b, c)) / (2 * h)

  n = act.shape[1] - 1
  for b in range(2):
    for k in range(3):
      if not valid[b, k]:
        np.testing.assert_array_equal(cams[b, k], 0.0)
        continue
      c = int(ids[b, k])
      # w_ch = mean over patches of ds/da: a directional derivative along "channel ch on all
      # patch tokens", taken by central differences with Richardson extrapolation (float32).
      w = np.zeros(act.shape[-1])
      for ch in range(act.shape[-1]):
        d = jnp.zeros_like(act).at[b, 1:, ch].set(1.0)
        w[ch] = (4 * deriv(d, b, c, 1e-2) - deriv(d, b, c, 2e-2)) / 3 / n
      a = np.asarray(act[b, 1:])
      m = np.maximum(a @ w, 0.0)
      m = m - m.min()
      m = m / (m.max() + 1e-7)
      np.testing.assert_allclose(np.asarray(cams[b, k]).reshape(-1), m, atol=2e-3)
