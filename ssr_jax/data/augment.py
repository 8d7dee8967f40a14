"""Training augmentation of §1.1 as a per-example *plan* plus a numpy executor.

Order (§1.1): random rescale by s ~ U[scale_range] to (int(s*H), int(s*W)), random horizontal
flip (p = 0.5), pad to at least crop_size x crop_size at a random offset (image 0, mask 255,
superpixels -1), random crop_size crop; optional colour jitter (image only, off by default).

Fidelity: WeCLIP rescales with `PIL.Image.resize` (BILINEAR for the image, NEAREST for labels).
PIL's bilinear is a separable triangle filter whose support widens when shrinking (it
antialiases), evaluated in 22-bit fixed point as two passes with the intermediate rounded to
uint8. `plan()` reproduces PIL's coefficients (`precompute_coeffs` + `normalize_coeffs_8bpc` of
Pillow's Resample.c), its pass order (Pillow >= 13 runs the vertical pass first when the height
shrinks by more than twice what the width does; older Pillow, as WeCLIP used, always runs the
horizontal pass first: the two orders differ by at most 1 grey level on a few pixels) and its
nearest-neighbour source indices (`ImagingScaleAffine`, which accumulates the source coordinate in
float64), so the numpy executor here and the TensorFlow executor in `pipeline_tf.py` both
reproduce `PIL.Image.resize` of Pillow 13 bit for bit (tests/data/test_augment.py checks).
All randomness and all floating-point index arithmetic lives in `plan()` (numpy, host side);
executors only gather and do integer multiply-adds, so the two pipelines give identical uint8
images.

Only the crop_size x crop_size output window of the rescaled image is ever computed: the plan
maps each output row/column straight to its source taps, so a 2x upscale costs the same as 1x.
"""

import dataclasses
import math

import numpy as np

PRECISION_BITS = 22  # Pillow's 8-bit resampling precision (32 - 8 - 2).
NUM_DRAWS = 9  # scale, flip, pad y/x, crop y/x, brightness, contrast, saturation.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, for contrast/saturation jitter.


def draws(seed: int, position: int) -> np.ndarray:
  """float64 [NUM_DRAWS] uniforms in [0, 1) for the example at global stream position.

  A pure function of (seed, position): any pipeline, host or resumed run draws the same numbers.
  """
  return np.random.default_rng([int(seed), 0, int(position)]).random(NUM_DRAWS)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where each pixel of one S x S training crop comes from.

  Bilinear taps are relative to the source window (row0, col0) that the crop reads.
  """

  vertical_first: bool  # Pass order of Pillow >= 13 (see module docstring).
  row0: int  # The crop reads source rows row0..row1-1 and columns col0..col1-1.
  row1: int
  col0: int
  col1: int
  row_taps: np.ndarray  # int32 [S, Ky] source row (minus row0) of each vertical-pass tap.
  row_weights: np.ndarray  # int32 [S, Ky] fixed-point weights (0 on padded rows).
  col_taps: np.ndarray  # int32 [S, Kx] source column (minus col0) of each horizontal tap.
  col_weights: np.ndarray  # int32 [S, Kx]
  row_nearest: np.ndarray  # int32 [S] source row for nearest sampling (0 on padded rows).
  col_nearest: np.ndarray  # int32 [S]
  row_valid: np.ndarray  # bool [S] output row lies inside the rescaled image (else padding).
  col_valid: np.ndarray  # bool [S]
  jitter: np.ndarray  # float32 [3] brightness, contrast, saturation factors (1 = identity).


def pil_bilinear_coeffs(in_size: int, out_size: int, out_index: np.ndarray):
  """Pillow's BILINEAR taps for the given output indices of an in_size -> out_size resize.

  Returns (first int64 [M], weights int32 [M, K]): output i = sum_k w[i,k] * x[first[i] + k],
  in 2**-22 units. Mirrors Resample.c `precompute_coeffs` and `normalize_coeffs_8bpc` operation
  by operation (same float64 expressions, same sequential sum) so the integers are identical.
  """
  scale = float(np.float32(in_size)) / out_size  # Pillow passes the box edge as a C float.
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale  # Bilinear support is 1, widened when shrinking (antialias).
  ksize = int(math.ceil(support)) * 2 + 1
  center = (out_index.astype(np.float64) + 0.5) * scale
  ss = 1.0 / filterscale
  xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
  xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
  k = np.zeros((len(out_index), ksize), np.float64)
  ww = np.zeros(len(out_index), np.float64)
  for x in range(ksize):
    t = np.abs(((x + xmin) - center + 0.5) * ss)
    w = np.where((t < 1.0) & (x < xmax), 1.0 - t, 0.0)
    k[:, x] = w
    ww = ww + w  # Sequential, as the C loop (adding 0.0 past xmax is exact).
  k = np.where(ww[:, None] != 0.0, k / np.where(ww == 0.0, 1.0, ww)[:, None], k)
  kk = np.trunc(0.5 + k * (1 << PRECISION_BITS)).astype(np.int32)  # Weights are >= 0 here.
  return xmin, kk


def pil_nearest_index(in_size: int, out_size: int) -> np.ndarray:
  """int64 [out_size] source index of each output of Pillow's NEAREST resize.

  Pillow (ImagingScaleAffine) starts at 0.5 * scale and adds scale per pixel in float64, then
  truncates; the accumulated rounding makes it differ from floor((i + .5) * scale) at exact
  boundaries, so we accumulate the same way (np.cumsum is sequential).
  """
  a = float(np.float32(in_size)) / out_size
  steps = np.full(out_size, a)
  steps[0] = a * 0.5
  return np.minimum(np.cumsum(steps).astype(np.int64), in_size - 1)


def _window(first, weights, size):
  """Tap indices relative to the smallest source window holding every weighted tap."""
  taps = np.minimum(first[:, None] + np.arange(weights.shape[1]), size - 1)
  used = taps[weights > 0]
  lo = int(used.min()) if used.size else 0
  hi = int(used.max()) + 1 if used.size else 1
  return np.clip(taps - lo, 0, hi - lo - 1), lo, hi


def plan(
  height: int,
  width: int,
  u: np.ndarray,
  *,
  crop_size: int,
  scale_range=(0.5, 2.0),
  hflip: bool = True,
  color_jitter: float = 0.0,
) -> Plan:
  """The augmentation plan of one [height, width] example from its uniforms u [NUM_DRAWS]."""
  s = float(scale_range[0]) + float(u[0]) * (float(scale_range[1]) - float(scale_range[0]))
  nh, nw = max(int(s * height), 1), max(int(s * width), 1)  # WeCLIP: int(scale * size).
  flip = bool(hflip) and u[1] < 0.5
  ph, pw = max(crop_size, nh), max(crop_size, nw)
  oy, ox = int(u[2] * (ph - nh + 1)), int(u[3] * (pw - nw + 1))  # Pad offset.
  cy, cx = int(u[4] * (ph - crop_size + 1)), int(u[5] * (pw - crop_size + 1))  # Crop offset.

  out = np.arange(crop_size)
  rows = cy + out - oy  # Row of the rescaled image shown at each output row.
  cols = cx + out - ox
  row_valid = (rows >= 0) & (rows < nh)
  col_valid = (cols >= 0) & (cols < nw)
  rows = np.where(row_valid, rows, 0)
  cols = np.where(col_valid, cols, 0)
  if flip:
    cols = nw - 1 - cols

  rfirst, rw = pil_bilinear_coeffs(height, nh, rows)
  cfirst, cw = pil_bilinear_coeffs(width, nw, cols)
  rw = np.where(row_valid[:, None], rw, 0)
  cw = np.where(col_valid[:, None], cw, 0)
  row_taps, row0, row1 = _window(rfirst, rw, height)
  col_taps, col0, col1 = _window(cfirst, cw, width)

  row_nn = np.where(row_valid, pil_nearest_index(height, nh)[rows], 0)
  col_nn = np.where(col_valid, pil_nearest_index(width, nw)[cols], 0)

  j = float(color_jitter)
  jitter = (1.0 + j * (2.0 * np.asarray(u[6:9], np.float64) - 1.0)).astype(np.float32)
  dh, dw = height - nh, width - nw
  return Plan(
    vertical_first=bool(dh > 0 and dh > 2 * dw),  # Pillow 13 ImagingResampleInner.
    row0=row0,
    row1=row1,
    col0=col0,
    col1=col1,
    row_taps=row_taps.astype(np.int32),
    row_weights=rw.astype(np.int32),
    col_taps=col_taps.astype(np.int32),
    col_weights=cw.astype(np.int32),
    row_nearest=row_nn.astype(np.int32),
    col_nearest=col_nn.astype(np.int32),
    row_valid=row_valid,
    col_valid=col_valid,
    jitter=jitter,
  )


def _clip8(acc: np.ndarray) -> np.ndarray:
  return np.clip(acc >> PRECISION_BITS, 0, 255)


def _pass(x, taps, weights, axis):
  """One Pillow 8-bit pass along axis (0 rows, 1 columns) of uint8 [R, C, 3] -> uint8."""
  acc = None
  for k in range(taps.shape[1]):
    g = np.take(x, taps[:, k], axis=axis)  # uint8 gathers; the products are int32.
    term = g * (weights[:, k, None, None] if axis == 0 else weights[None, :, k, None])
    if acc is None:
      acc = term + np.int32(1 << (PRECISION_BITS - 1))  # Pillow's rounding offset.
    else:
      acc += term
  return _clip8(acc).astype(np.uint8)


def valid_span(valid: np.ndarray) -> tuple[int, int]:
  """[lo, hi) of the (contiguous) True entries of a bool vector; (0, 0) if none."""
  idx = np.flatnonzero(valid)
  return (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)


def resample_image(image: np.ndarray, p: Plan) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [S, S, 3]: Pillow-exact bilinear rescale, flip, pad and crop."""
  out = np.zeros((len(p.row_valid), len(p.col_valid), 3), np.uint8)  # Padding is 0 (§1.1).
  (r0, r1), (c0, c1) = valid_span(p.row_valid), valid_span(p.col_valid)
  if r1 == r0 or c1 == c0:
    return out
  x = image[p.row0 : p.row1, p.col0 : p.col1]
  rows = (p.row_taps[r0:r1], p.row_weights[r0:r1], 0)  # Only the unpadded output block.
  cols = (p.col_taps[c0:c1], p.col_weights[c0:c1], 1)
  first, second = (rows, cols) if p.vertical_first else (cols, rows)
  out[r0:r1, c0:c1] = _pass(_pass(x, *first), *second)
  return out


def resample_labels(labels: np.ndarray, p: Plan, fill: int) -> np.ndarray:
  """[H, W] -> [S, S]: nearest rescale (ids stay valid), flip, pad with `fill`, crop."""
  out = labels[p.row_nearest][:, p.col_nearest]
  out[~p.row_valid] = fill
  out[:, ~p.col_valid] = fill
  return out


def color_jitter(image: np.ndarray, p: Plan) -> np.ndarray:
  """Brightness, contrast, saturation by p.jitter factors on the valid (unpadded) pixels.

  float32 arithmetic, each step clipped to [0, 255], rounded half-to-even at the end; the
  contrast mean is over valid pixels. Identity when all factors are 1.
  """
  if np.all(p.jitter == 1.0):
    return image
  valid = (p.row_valid[:, None] & p.col_valid[None, :]).astype(np.float32)[..., None]
  w = np.asarray(GRAY_WEIGHTS, np.float32)
  x = image.astype(np.float32)
  x = np.clip(x * p.jitter[0], 0.0, 255.0)
  gray = x[..., 0] * w[0] + x[..., 1] * w[1] + x[..., 2] * w[2]
  mean = np.float32(np.sum(gray.astype(np.float64) * valid[..., 0]) / max(float(valid.sum()), 1.0))
  x = np.clip((x - mean) * p.jitter[1] + mean, 0.0, 255.0)
  gray = (x[..., 0] * w[0] + x[..., 1] * w[1] + x[..., 2] * w[2])[..., None]
  x = np.clip((x - gray) * p.jitter[2] + gray, 0.0, 255.0)
  return (np.rint(x) * valid).astype(np.uint8)


def apply(image, mask, superpixels, p: Plan, *, ignore_label: int = 255):
  """Executes a plan on one example (numpy).

  Args: image uint8 [H, W, 3], mask uint8 [H, W], superpixels int32 [H, W] or None.
  Returns (image uint8 [S, S, 3], mask uint8 [S, S] with ignore_label padding, superpixels int32
  [S, S] with -1 padding; without superpixel input, 0 inside the image so the valid region is
  still visible).
  """
  img = color_jitter(resample_image(image, p), p)
  m = resample_labels(mask, p, ignore_label)
  return img, m, resample_regions(superpixels, p)


def resample_regions(regions, p: Plan) -> np.ndarray:
  """Region ids (superpixels, colour clusters) int [H, W] or None -> int32 [S, S].

  Nearest rescale, flip, pad with -1, crop; None gives the valid-region layout (0 inside the
  image, -1 on padding).
  """
  if regions is None:
    out = np.zeros((len(p.row_valid), len(p.col_valid)), np.int32)
    out[~p.row_valid] = -1
    out[:, ~p.col_valid] = -1
    return out
  return resample_labels(regions.astype(np.int32, copy=False), p, -1)
