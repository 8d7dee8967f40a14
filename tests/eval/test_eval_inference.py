"""Multi-scale + flip inference against a PyTorch oracle, and batched == single."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssr_jax.eval.inference import (
  input_sizes,
  iter_predictions,
  predict_batch,
  predict_single,
  round_to_multiple,
)

C = 5
_rng = np.random.default_rng(0)
W1 = (_rng.standard_normal((16, 16, 3, 8)) * 0.05).astype(np.float32)
B1 = (_rng.standard_normal(8) * 0.1).astype(np.float32)
W2 = (_rng.standard_normal((3, 3, 8, C)) * 0.5).astype(np.float32)
W3 = (_rng.standard_normal((8, C)) * 0.5).astype(np.float32)
PARAMS = {"w1": W1, "b1": B1, "w2": W2, "w3": W3}


def jax_logits(params, x):
  """Stride-16 patch conv, tanh, 3x3 conv plus a global-mean term: [B, H/16, W/16, C].

  Random 3x3 weights make it not flip-symmetric; the global term makes any padding visible.
  """
  dn = ("NHWC", "HWIO", "NHWC")
  p = jax.lax.conv_general_dilated(x, params["w1"], (16, 16), "VALID", dimension_numbers=dn)
  p = jnp.tanh(p + params["b1"])
  y = jax.lax.conv_general_dilated(p, params["w2"], (1, 1), "SAME", dimension_numbers=dn)
  return y + p.mean(axis=(1, 2), keepdims=True) @ params["w3"]


def closure_logits(x):
  return jax_logits(PARAMS, x)


def torch_logits(x):
  """The same model in PyTorch, NCHW."""
  p = torch.tanh(
    F.conv2d(x, torch.from_numpy(W1).permute(3, 2, 0, 1), stride=16)
    + torch.from_numpy(B1)[:, None, None]
  )
  y = F.conv2d(p, torch.from_numpy(W2).permute(3, 2, 0, 1), padding=1)
  g = p.mean(dim=(2, 3)) @ torch.from_numpy(W3)
  return y + g[:, :, None, None]


def torch_predict(image, *, scales, flip, long_side, out_size=None):
  """Oracle: WeCLIP's loop with F.interpolate; flips are undone before resizing."""
  up = lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
  r16 = lambda n: max(16, 16 * math.floor(n / 16 + 0.5))
  h, w = image.shape[:2]
  ratio = long_side / max(h, w)
  h1, w1 = r16(int(h * ratio)), r16(int(w * ratio))
  x1 = up(torch.from_numpy(image).permute(2, 0, 1)[None], (h1, w1))
  grid = torch_logits(x1).shape[2:]
  segs = []
  for s in scales:
    xs = up(x1, (r16(h1 * s), r16(w1 * s)))
    a = up(torch_logits(xs), grid)
    if flip:
      b = up(torch_logits(xs.flip(-1)).flip(-1), grid)
      a = (a + b) / 2
    segs.append(a)
  msc = torch.stack(segs).mean(0)
  full = up(msc, out_size or (h, w))[0].permute(1, 2, 0).numpy()
  return full.argmax(-1), msc[0].permute(1, 2, 0).numpy(), full


def _image(h, w, seed):
  return np.random.default_rng(seed).standard_normal((h, w, 3)).astype(np.float32)


def _assert_labels_match(pred, expect, full_logits):
  """Equal labels except where the oracle's top-2 logits are within float noise."""
  top2 = np.sort(full_logits, axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 1e-4
  assert decided.mean() > 0.99
  np.testing.assert_array_equal(pred[decided], expect[decided])


def test_size_rule_hand_computed():
  assert round_to_multiple(8, 16) == 16 and round_to_multiple(4, 16) == 16
  assert round_to_multiple(23.9, 16) == 16 and round_to_multiple(24, 16) == 32
  # VOC 500x375 (H=375): exactly WeCLIP's 384x512 and 288x384.
  assert input_sizes(375, 500, scales=(1.0, 0.75)) == ((384, 512), [(384, 512), (288, 384)])
  # 333 -> int(340.992) = 340 -> 336; 336 * 0.75 = 252 -> 256.
  assert input_sizes(333, 500, scales=(1.0, 0.75)) == ((336, 512), [(336, 512), (256, 384)])
  # 281 -> int(287.744) = 287 -> 288; 288 * 0.75 = 216 -> 224 (13.5 rounds up).
  assert input_sizes(500, 281, scales=(1.0, 0.75)) == ((512, 288), [(512, 288), (384, 224)])
  assert input_sizes(40, 70, scales=(0.5,), long_side=None) == ((48, 64), [(32, 32)])


@pytest.mark.parametrize("hw", [(45, 70), (61, 38)])
def test_predict_single_matches_torch_oracle(hw):
  image = _image(*hw, seed=hw[0])
  kw = dict(scales=(1.0, 0.75, 0.5), flip=True, long_side=96)
  pred, logits = predict_single(closure_logits, image, return_logits=True, **kw)
  expect, msc, full = torch_predict(image, **kw)
  np.testing.assert_allclose(logits, msc, atol=1e-4, rtol=1e-4)
  assert pred.shape == hw and pred.dtype == np.int32
  _assert_labels_match(pred, expect, full)
  # Flip matters for this model, so the test above would catch a wrong flip.
  no_flip = predict_single(closure_logits, image, scales=kw["scales"], flip=False, long_side=96)
  assert (no_flip != pred).mean() > 0.01
  # Output size override (e.g. a ground truth of another size) and the params path.
  pred2 = predict_single(jax_logits, image, params=PARAMS, out_size=(30, 50), **kw)
  expect2, _, full2 = torch_predict(image, out_size=(30, 50), **kw)
  _assert_labels_match(pred2, expect2, full2)


SIZES = [(30, 40), (45, 60), (60, 45), (20, 64), (50, 50), (33, 41), (47, 64)]


def _images():
  return [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


def test_predict_batch_equals_single_ragged_and_padded():
  images = _images()
  out_sizes = [im.shape[:2] for im in images]
  out_sizes[3] = (25, 70)
  kw = dict(scales=(1.0, 0.75), flip=True, long_side=64)
  # Scale-1 buckets: (48, 64) holds 4 images -> a full batch of 3, then 1 image + 2 dummies;
  # (64, 48), (16, 64), (64, 64) hold 1 image + 2 dummies each.
  got = predict_batch(
    closure_logits, images, batch_size=3, out_sizes=out_sizes, return_logits=True, **kw
  )
  for im, out, (pred, logits) in zip(images, out_sizes, got):
    ref_pred, ref_logits = predict_single(
      closure_logits, im, out_size=out, return_logits=True, **kw
    )
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert pred.shape == tuple(out)
    _, _, full = torch_predict(im, out_size=out, **kw)
    _assert_labels_match(pred, ref_pred, full)


def test_predict_batch_sharded_streams_each_image_once():
  images = _images()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  kw = dict(scales=(1.0, 0.75), flip=True, long_side=64)
  seen = {}
  gen = (im for im in images)  # A one-pass iterable, as a data pipeline gives.
  for i, pred in iter_predictions(
    jax_logits, gen, params=PARAMS, batch_size=8, sharding=sharding, **kw
  ):
    assert i not in seen
    seen[i] = pred
  assert sorted(seen) == list(range(len(images)))
  for i, im in enumerate(images):
    ref = predict_single(closure_logits, im, **kw)
    _, _, full = torch_predict(im, **kw)
    _assert_labels_match(seen[i], ref, full)
  with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
    list(iter_predictions(closure_logits, images, batch_size=4, sharding=sharding, **kw))


def test_rejects_uint8_images():
  with pytest.raises(ValueError, match="normalise"):
    predict_single(closure_logits, np.zeros((32, 32, 3), np.uint8))
