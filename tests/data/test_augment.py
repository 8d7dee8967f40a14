"""augment.py against an independent oracle: WeCLIP's PIL-based rescale/flip/pad/crop."""

import numpy as np
import PIL
import pytest
from PIL import Image

from ssr_jax.data import augment

PIL_13 = int(PIL.__version__.split(".")[0]) >= 13  # Pass order of Pillow >= 13 (augment.py).


def weclip_reference(image, mask, sp, u, crop, scale_range=(0.5, 2.0)):
  """WeCLIP's transforms (PIL resize, np.fliplr, zero/255 pad at an offset, crop) on our draws."""
  h, w = mask.shape
  s = scale_range[0] + u[0] * (scale_range[1] - scale_range[0])
  nh, nw = max(int(s * h), 1), max(int(s * w), 1)
  im = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  m = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
  spr = np.asarray(Image.fromarray(sp).resize((nw, nh), Image.NEAREST)).astype(np.int32)
  if u[1] < 0.5:
    im, m, spr = im[:, ::-1], m[:, ::-1], spr[:, ::-1]
  ph, pw = max(crop, nh), max(crop, nw)
  oy, ox = int(u[2] * (ph - nh + 1)), int(u[3] * (pw - nw + 1))
  cy, cx = int(u[4] * (ph - crop + 1)), int(u[5] * (pw - crop + 1))
  canvas = [
    np.zeros((ph, pw, 3), np.uint8),
    np.full((ph, pw), 255, np.uint8),
    np.full((ph, pw), -1, np.int32),
  ]
  for c, x in zip(canvas, (im, m, spr)):
    c[oy : oy + nh, ox : ox + nw] = x
  return [c[cy : cy + crop, cx : cx + crop] for c in canvas]


@pytest.mark.parametrize("case", range(60))
def test_matches_pil_reference(case):
  rng = np.random.default_rng(case)
  h, w = (int(v) for v in rng.integers(8, 260, 2))
  x = rng.integers(0, 256, (h, w, 3)).astype(np.int64)
  image = (np.cumsum(x, 0) // 3 % 256).astype(np.uint8)
  mask = rng.integers(0, 21, (h, w)).astype(np.uint8)
  sp = rng.integers(0, 300, (h, w)).astype(np.int32)
  u = rng.random(augment.NUM_DRAWS)
  crop = int(rng.choice([32, 96, 160]))
  p = augment.plan(h, w, u, crop_size=crop)
  got = augment.apply(image, mask, sp, p)
  want = weclip_reference(image, mask, sp, u, crop)
  diff = np.abs(got[0].astype(int) - want[0]).max()
  assert diff <= (0 if PIL_13 else 1)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[2], want[2])


def test_nearest_index_matches_pil():
  for n_in in (1, 7, 100, 375, 500):
    src = Image.fromarray(np.arange(n_in, dtype=np.int32)[None]).convert("I")
    for n_out in (1, 3, 99, 160, 250, 333, 749, 1000):
      want = np.asarray(src.resize((n_out, 1), Image.NEAREST))[0]
      np.testing.assert_array_equal(augment.pil_nearest_index(n_in, n_out), want)


def test_bilinear_coeffs_sum_to_one_and_antialias():
  first, kk = augment.pil_bilinear_coeffs(500, 200, np.arange(200))
  # Weights are 22-bit fixed point summing to ~1; shrinking widens the support (antialias).
  assert np.all(np.abs(kk.sum(1) - (1 << 22)) <= kk.shape[1])
  assert (kk > 0).sum(1).max() >= 5
  first, kk = augment.pil_bilinear_coeffs(100, 300, np.arange(300))
  assert (kk > 0).sum(1).max() <= 2


def test_draws_pure_function_of_seed_and_position():
  np.testing.assert_array_equal(augment.draws(3, 17), augment.draws(3, 17))
  assert not np.array_equal(augment.draws(3, 17), augment.draws(3, 18))
  assert not np.array_equal(augment.draws(3, 17), augment.draws(4, 17))


def test_padding_and_valid_region():
  image = np.full((40, 30, 3), 200, np.uint8)
  mask = np.ones((40, 30), np.uint8)
  u = np.array([0.0, 0.9, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 0.5])  # Scale 0.5 -> 20x15 in 64x64.
  p = augment.plan(40, 30, u, crop_size=64)
  img, m, sp = augment.apply(image, mask, None, p)
  inside = sp >= 0
  assert inside.sum() == 20 * 15
  assert np.all(img[~inside] == 0) and np.all(m[~inside] == 255)
  assert np.all(img[inside] == 200) and np.all(m[inside] == 1) and np.all(sp[inside] == 0)


def test_color_jitter():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (50, 50, 3)).astype(np.uint8)
  mask = np.zeros((50, 50), np.uint8)
  u = rng.random(augment.NUM_DRAWS)
  off = augment.apply(image, mask, None, augment.plan(50, 50, u, crop_size=80))[0]
  p = augment.plan(50, 50, u, crop_size=80, color_jitter=0.4)
  on = augment.apply(image, mask, None, p)[0]
  valid = p.row_valid[:, None] & p.col_valid[None, :]
  assert np.all(on[~valid] == 0)  # Padding stays 0.
  assert not np.array_equal(on[valid], off[valid])
  # Brightness alone (contrast = saturation = 1) is a clipped scale of the unjittered crop.
  u2 = u.copy()
  u2[7:9] = 0.5
  p2 = augment.plan(50, 50, u2, crop_size=80, color_jitter=0.4)
  b = p2.jitter[0]
  got = augment.apply(image, mask, None, p2)[0].astype(np.float32)
  want = np.rint(np.clip(off.astype(np.float32) * b, 0, 255))
  np.testing.assert_array_equal(got[valid], want[valid])
