"""Multi-scale + flip inference (method.md §1.8), generic over a logits function.

`logits_fn(images [B, H, W, 3] float32, normalised) -> logits [B, H', W', C]`, where H' x W' may be
the input size or a coarser grid (H/16 x W/16 for the ViT decoder); `logits_fn(params, images)`
when `params` is given, so that large weights are jit arguments rather than constants compiled
into every program.

Pipeline per image [H, W, 3] (WeCLIP's test_msc_flip_voc.py, §1.8):
1. Long-side resize: ratio = long_side / max(H, W) and (int(H * ratio), int(W * ratio)), as
   WeCLIP (images smaller than long_side are enlarged); long_side=None skips this step.
2. Size rule: every network input side is rounded to the NEAREST multiple of `multiple` (16, the
   ViT patch; halves round up; at least `multiple`). The scale-1 input is the long-side size
   rounded; the scale-s input is round(H1 * s) x round(W1 * s) from the scale-1 size H1 x W1 and
   is resized from the scale-1 image (as WeCLIP resizes the already-resized input). Nothing is
   padded, so the ViT never sees padding and the logits grid covers the image exactly.
   Compared with WeCLIP: for VOC's common 500x375 (-> 512x384, 0.75 -> 384x288) the sizes are
   identical. For sides that are not multiples of 16 WeCLIP lets the stride-16 conv drop the last
   H mod 16 rows (e.g. 340 -> 21 patches covering 336 rows, then stretched over 340); we resize to
   336 instead. WeCLIP also resizes scale s with `scale_factor=s` (PyTorch then samples with 1/s,
   not in/out); our resizes all use in/out, which coincide whenever H1 * s is an integer.
   All resizes are bilinear, align_corners=False, no antialiasing (`ssr_jax.resize`).
3. For each scale: run the image and (flip=True) its horizontal mirror, mirror the second
   logits back, resize both logits bilinearly to the logits grid of the scale-1 input (whatever
   logits_fn returns for it, found with jax.eval_shape) and average over scales and flips.
4. Resize those averaged logits bilinearly to the output (ground-truth) size and take argmax.
   The averaged scale-1-grid logits are also what the dense CRF starts from (§1.8, `crf.py`).

Batching (`iter_predictions` / `predict_batch`): a ViT with global attention sees any padding,
so images are NOT padded to a common size: they are bucketed by their exact scale-1 input size,
each bucket compiles once, and a batch is filled with images of one bucket only. The last batch
of a bucket is completed with zero dummy images whose outputs are dropped. The per-image final
resize runs on device with per-image interpolation matrices, padded to a multiple of 128 so that
few output shapes compile; the padding rows are zero and cropped on the host.
"""

import functools
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax.resize import interp_matrix, resize

_OUT_PAD = 128  # Output sizes are padded to a multiple of this so few final-resize shapes compile.


def round_to_multiple(n: float, multiple: int) -> int:
  """Nearest multiple of `multiple` to n (halves round up), at least `multiple`."""
  return max(int(multiple), int(np.floor(n / multiple + 0.5)) * int(multiple))


def input_sizes(h: int, w: int, *, scales, long_side: int | None = 512, multiple: int = 16):
  """Network input sizes for an h x w image: ((H1, W1), [(H_s, W_s) for s in scales]).

  (H1, W1) is the scale-1 size (long-side resize then rounding, module docstring step 2).
  """
  if long_side:
    ratio = long_side / max(h, w)
    h, w = int(h * ratio), int(w * ratio)  # Truncation, as WeCLIP's int(h * ratio).
  h1, w1 = round_to_multiple(h, multiple), round_to_multiple(w, multiple)
  sizes = [
    (round_to_multiple(h1 * s, multiple), round_to_multiple(w1 * s, multiple)) for s in scales
  ]
  return (h1, w1), sizes


def plan_batches(shapes, *, limit: int, devices: int, long_side, multiple: int) -> list:
  """[(batch_size, image indices)] per network input size, for images of `shapes` [(H, W)].

  Images of one input size share a compiled program and a batch; a batch holds no more than
  the images at hand (at most `limit`), rounded up to a multiple of `devices`, so one photo is
  not padded with eval.batch_size - 1 dummies (75 s for one 400x600 image on a CPU). Used by
  evaluation and predict.py.
  """
  groups = {}
  for i, (h, w) in enumerate(shapes):
    size, _ = input_sizes(h, w, scales=(), long_side=long_side, multiple=multiple)
    groups.setdefault(size, []).append(i)
  plan = []
  for idx in groups.values():
    n = min(limit, len(idx))
    plan.append((-(-n // devices) * devices, idx))
  return plan


def resize_np(x: np.ndarray, size, method: str = "bilinear") -> np.ndarray:
  """Host-side torch-exact resize of x [H, W, ...] to size (h, w), float32."""
  x = np.asarray(x, np.float32)
  if x.shape[:2] == tuple(size):
    return x
  mh = interp_matrix(x.shape[0], int(size[0]), method)
  mw = interp_matrix(x.shape[1], int(size[1]), method)
  x = np.tensordot(mh, x, axes=([1], [0]))
  return np.moveaxis(np.tensordot(mw, x, axes=([1], [1])), 0, 1)


def prepare_image(image, *, long_side: int | None = 512, multiple: int = 16) -> np.ndarray:
  """Resizes a normalised float image [H, W, 3] to its scale-1 network size [H1, W1, 3]."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(
      f"expected a float image normalised with the model's mean/std (§1.1), got dtype "
      f"{image.dtype}; normalise uint8 images before inference"
    )
  (h1, w1), _ = input_sizes(*image.shape[:2], scales=(), long_side=long_side, multiple=multiple)
  return resize_np(image, (h1, w1))


def multiscale_logits(
  logits_fn, images, *, params=None, scales=(1.0, 0.75), flip: bool = True, multiple: int = 16
):
  """Averaged multi-scale (+ flip) logits [B, h1, w1, C] float32 on the scale-1 logits grid.

  images: [B, H1, W1, 3] float32 at the scale-1 size (`prepare_image`). Pure jax (jit it with
  logits_fn, scales, flip and multiple static, as `predict_batch` does).
  """
  fn = logits_fn if params is None else functools.partial(logits_fn, params)
  b, h1, w1, _ = images.shape
  ref = jax.eval_shape(fn, jax.ShapeDtypeStruct(images.shape, jnp.float32))
  grid = ref.shape[1:3]
  total = None
  for s in scales:
    size = (round_to_multiple(h1 * s, multiple), round_to_multiple(w1 * s, multiple))
    x = resize(images.astype(jnp.float32), size)
    if flip:
      x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
    y = resize(fn(x).astype(jnp.float32), grid)
    if flip:
      y = y[:b] + y[b:, :, ::-1]
    total = y if total is None else total + y
  return total / (len(scales) * (2 if flip else 1))


_multiscale_jit = jax.jit(
  multiscale_logits, static_argnums=0, static_argnames=("scales", "flip", "multiple")
)


def predict_single(
  logits_fn,
  image,
  *,
  params=None,
  scales=(1.0, 0.75),
  flip: bool = True,
  long_side: int | None = 512,
  multiple: int = 16,
  out_size=None,
  return_logits: bool = False,
):
  """Prediction int32 [H, W] for one normalised float image [H, W, 3] (reference path).

  out_size: (H, W) of the ground truth; defaults to the image size. With return_logits, also
  returns the averaged logits [h1, w1, C] on the scale-1 logits grid (the CRF's input).
  """
  out_size = tuple(np.asarray(image).shape[:2]) if out_size is None else tuple(out_size)
  x = prepare_image(image, long_side=long_side, multiple=multiple)
  logits = _multiscale_jit(
    logits_fn,
    jnp.asarray(x)[None],
    params=params,
    scales=tuple(scales),
    flip=flip,
    multiple=multiple,
  )[0]
  pred = np.asarray(jnp.argmax(resize(logits, out_size), axis=-1), np.int32)
  return (pred, np.asarray(logits)) if return_logits else pred


@jax.jit
def _upsample_argmax(logits, mh, mw):
  """logits [B, h, w, C], mh [B, Hp, h], mw [B, Wp, w] -> argmax int32 [B, Hp, Wp]."""
  y = jnp.einsum("bHh,bhwc->bHwc", mh, logits)
  y = jnp.einsum("bWw,bHwc->bHWc", mw, y)
  return jnp.argmax(y, axis=-1).astype(jnp.int32)


def _batch_shards(sharding, batch_size: int) -> int:
  """How many ways `sharding` splits the leading (batch) axis."""
  if sharding is None:
    return 1
  spec = getattr(sharding, "spec", None)
  if spec is None or len(spec) == 0 or spec[0] is None:
    return 1
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def iter_predictions(
  logits_fn,
  images: Iterable,
  *,
  params=None,
  scales=(1.0, 0.75),
  flip: bool = True,
  long_side: int | None = 512,
  multiple: int = 16,
  batch_size: int = 8,
  sharding=None,
  out_sizes: Sequence | None = None,
  return_logits: bool = False,
) -> Iterator[tuple]:
  """Streams (index, pred int32 [H_i, W_i]) (+ logits [h1, w1, C] if return_logits).

  images: any iterable of normalised float images [H_i, W_i, 3] (not held all at once: at most
  batch_size - 1 images per size bucket wait in memory). Results come in completion order, each
  image exactly once. sharding: optional `jax.sharding.NamedSharding` whose spec's first entry
  names the batch mesh axis; batch_size must be a multiple of that axis size. out_sizes[i]
  overrides image i's output size (default: its own size).
  """
  scales = tuple(float(s) for s in scales)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  shards = _batch_shards(sharding, batch_size)
  if batch_size % shards:
    raise ValueError(
      f"batch_size {batch_size} is not a multiple of the {shards} devices on the sharded batch "
      "axis; choose a batch size divisible by the device count"
    )
  put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else jnp.asarray

  def run(items):
    n = len(items)
    x = np.stack([it[1] for it in items] + [np.zeros_like(items[0][1])] * (batch_size - n))
    logits = _multiscale_jit(
      logits_fn, put(x), params=params, scales=scales, flip=flip, multiple=multiple
    )
    h, w = logits.shape[1:3]
    hp = -(-max(it[2][0] for it in items) // _OUT_PAD) * _OUT_PAD
    wp = -(-max(it[2][1] for it in items) // _OUT_PAD) * _OUT_PAD
    mh = np.zeros((batch_size, hp, h), np.float32)
    mw = np.zeros((batch_size, wp, w), np.float32)
    for k, (_, _, (oh, ow)) in enumerate(items):
      mh[k, :oh] = interp_matrix(h, oh, "bilinear")
      mw[k, :ow] = interp_matrix(w, ow, "bilinear")
    preds = np.asarray(_upsample_argmax(logits, put(mh), put(mw)))
    host_logits = np.asarray(logits) if return_logits else None
    for k, (i, _, (oh, ow)) in enumerate(items):
      pred = preds[k, :oh, :ow]
      yield (i, pred, host_logits[k]) if return_logits else (i, pred)

  buckets: dict[tuple[int, int], list] = {}
  for i, image in enumerate(images):
    image = np.asarray(image)
    out = tuple(image.shape[:2]) if out_sizes is None else tuple(int(v) for v in out_sizes[i])
    x = prepare_image(image, long_side=long_side, multiple=multiple)
    bucket = buckets.setdefault(x.shape[:2], [])
    bucket.append((i, x, out))
    if len(bucket) == batch_size:
      yield from run(buckets.pop(x.shape[:2]))
  for key in list(buckets):
    yield from run(buckets.pop(key))


def predict_batch(logits_fn, images: Sequence, **kwargs) -> list:
  """`iter_predictions` collected in input order: a list of int32 [H_i, W_i] predictions, or of
  (pred, logits) pairs with return_logits=True. Same keywords as `iter_predictions`."""
  out = [None] * len(images)
  for i, *rest in iter_predictions(logits_fn, images, **kwargs):
    out[i] = rest[0] if len(rest) == 1 else tuple(rest)
  return out
