"""tf.data training executor: the same batches as the numpy one (contract in examples.py).

The only module that imports TensorFlow. TF is kept off accelerators (environment.md pitfall 9).
A Python generator yields (split index, uniforms) for this host's stream positions; a parallel,
order-preserving map decodes with TF ops (JPEG with the accurate integer DCT that PIL uses),
gets the integer augmentation plan from `augment.plan` (numpy, tiny) and applies it with TF
gathers and integer multiply-adds, the same arithmetic as `augment.apply`. Palette PNG masks
(which TF would turn into colours) are decoded with PIL. A TF error surfacing for a batch is
re-diagnosed with the numpy loader so the DataError names the bad file.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_GCE_CHECK", "true")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ssr_jax.data import augment, files  # noqa: E402
from ssr_jax.data.examples import FileStore, TrainSource, assemble, load_example  # noqa: E402

tf.config.set_visible_devices([], "GPU")

_HALF = 1 << (augment.PRECISION_BITS - 1)


def _decode_image(data):
  """uint8 [H, W, 3] from encoded bytes; JPEG via libjpeg ISLOW, like PIL."""
  is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
  return tf.cond(
    is_jpeg,
    lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
    lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
  )


def _read_palette_png(data):
  import io

  from PIL import Image

  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im, np.uint8)


def _decode_mask(data, hw):
  """uint8 [H, W] class indices; palette PNGs (colour type 3) keep their raw indices; no bytes
  (an image without a mask) read as all 255 of the image's size hw."""

  def decode():
    is_palette = tf.equal(tf.strings.substr(data, 25, 1), b"\x03")
    return tf.cond(
      is_palette,
      lambda: tf.numpy_function(_read_palette_png, [data], tf.uint8, stateful=False),
      lambda: tf.io.decode_png(data, channels=1)[..., 0],
    )

  none = lambda: tf.fill(hw, tf.constant(files.IGNORE, tf.uint8))  # noqa: E731
  m = tf.cond(tf.equal(tf.strings.length(data), 0), none, decode)
  return tf.ensure_shape(m, [None, None])


def _plan_arrays(h, w, u, opts):
  p = opts.plan(int(h), int(w), u)
  return (
    np.bool_(p.vertical_first),
    np.asarray(
      [
        p.row0,
        p.row1,
        p.col0,
        p.col1,
        *augment.valid_span(p.row_valid),
        *augment.valid_span(p.col_valid),
      ],
      np.int32,
    ),
    p.row_taps,
    p.row_weights,
    p.col_taps,
    p.col_weights,
    p.row_nearest,
    p.col_nearest,
    p.row_valid,
    p.col_valid,
    p.jitter,
  )


def _pass(x, taps, weights, axis):
  """One Pillow 8-bit pass of int32 [R, C, 3] along axis (integer sums are order-free)."""
  if axis == 0:
    acc = tf.reduce_sum(tf.gather(x, taps, axis=0) * weights[:, :, None, None], axis=1)
  else:
    acc = tf.reduce_sum(tf.gather(x, taps, axis=1) * weights[None, :, :, None], axis=2)
  return tf.clip_by_value(tf.bitwise.right_shift(acc + _HALF, augment.PRECISION_BITS), 0, 255)


def _jitter(img, jitter, valid):
  """Mirror of augment.color_jitter in TF float32 ops."""
  w = tf.constant(augment.GRAY_WEIGHTS, tf.float32)
  vf = tf.cast(valid, tf.float32)
  x = tf.cast(img, tf.float32)
  x = tf.clip_by_value(x * jitter[0], 0.0, 255.0)
  gray = x[..., 0] * w[0] + x[..., 1] * w[1] + x[..., 2] * w[2]
  total = tf.reduce_sum(tf.cast(gray, tf.float64) * tf.cast(vf, tf.float64))
  mean = tf.cast(total / tf.maximum(tf.reduce_sum(tf.cast(vf, tf.float64)), 1.0), tf.float32)
  x = tf.clip_by_value((x - mean) * jitter[1] + mean, 0.0, 255.0)
  gray = (x[..., 0] * w[0] + x[..., 1] * w[1] + x[..., 2] * w[2])[..., None]
  x = tf.clip_by_value((x - gray) * jitter[2] + gray, 0.0, 255.0)
  return tf.cast(tf.round(x) * vf[..., None], tf.uint8)  # tf.round is half-to-even, as rint.


def _reader(store):
  """index -> (image, mask, superpixel or None, cluster or None) encoded bytes as tf.string.

  Folders are read by TF's file ops (local or gs://), TFDS records by random access.
  """
  if isinstance(store, FileStore):
    tables = [store.split.image_paths, store.split.mask_paths]
    tables += [store.superpixel_paths, store.cluster_paths]
    tables = [None if t is None else tf.constant(t) for t in tables]

    def read_file(path):  # "" = no such file (an image without a mask): no bytes.
      return tf.cond(tf.equal(path, ""), lambda: tf.constant(b""), lambda: tf.io.read_file(path))

    return lambda i: [None if t is None else read_file(tf.gather(t, i)) for t in tables]

  def fetch(i):
    enc = store.ref(int(i)).fetch()
    return enc.image, enc.mask, enc.superpixels or b"", enc.clusters or b""

  def read(i):
    out = tf.numpy_function(fetch, [i], [tf.string] * 4, stateful=False)
    out = [tf.ensure_shape(x, []) for x in out]
    return out[:2] + [out[2] if store.superpixels else None, out[3] if store.clusters else None]

  return read


def _example_fn(source: TrainSource):
  read = _reader(source.store)
  opts = source.augment
  c = source.split.num_classes
  s = opts.crop_size

  def fn(index, u):
    image_b, mask_b, sp_b, cl_b = read(index)
    image = _decode_image(image_b)
    hw = tf.shape(image)[:2]
    mask = _decode_mask(mask_b, hw)
    checks = [
      tf.debugging.assert_equal(tf.shape(mask), hw, message="mask size != image size"),
      tf.debugging.assert_equal(
        tf.reduce_any((mask >= c) & (mask != files.IGNORE)),
        False,
        message="mask value out of range",
      ),
    ]
    if sp_b is not None:
      sp = tf.io.decode_png(sp_b, 1, tf.uint16)[..., 0]
      sp = tf.cast(sp, tf.int32)
      checks.append(tf.debugging.assert_equal(tf.shape(sp), hw, message="superpixel size"))
    if cl_b is not None:
      cl = tf.io.decode_png(cl_b, 1, tf.uint8)[..., 0]
      cl = tf.cast(cl, tf.int32)
      checks.append(tf.debugging.assert_equal(tf.shape(cl), hw, message="cluster size"))
    with tf.control_dependencies(checks):
      outs = tf.numpy_function(
        lambda h, w, uu: _plan_arrays(h, w, uu, opts),
        [hw[0], hw[1], u],
        [
          tf.bool,
          tf.int32,
          tf.int32,
          tf.int32,
          tf.int32,
          tf.int32,
          tf.int32,
          tf.int32,
          tf.bool,
          tf.bool,
          tf.float32,
        ],
        stateful=False,
      )
    vfirst, win, rtaps, rw, ctaps, cw, rnn, cnn, rvalid, cvalid, jit = outs
    x = tf.cast(image[win[0] : win[1], win[2] : win[3]], tf.int32)
    r0, r1, c0, c1 = win[4], win[5], win[6], win[7]  # The unpadded output block.
    rt, rw, ct, cw = rtaps[r0:r1], rw[r0:r1], ctaps[c0:c1], cw[c0:c1]
    x = tf.cond(
      vfirst,
      lambda: _pass(_pass(x, rt, rw, 0), ct, cw, 1),
      lambda: _pass(_pass(x, ct, cw, 1), rt, rw, 0),
    )
    img = tf.pad(tf.cast(x, tf.uint8), [[r0, s - r1], [c0, s - c1], [0, 0]])  # Padding 0.
    valid = tf.reshape(rvalid, [s, 1]) & tf.reshape(cvalid, [1, s])
    if opts.color_jitter > 0:
      img = _jitter(img, tf.reshape(jit, [3]), valid)
    img = tf.ensure_shape(img, [s, s, 3])

    def nearest(lab, fill):
      out = tf.gather(tf.gather(lab, rnn, axis=0), cnn, axis=1)
      return tf.ensure_shape(tf.where(valid, out, tf.cast(fill, lab.dtype)), [s, s])

    m = nearest(mask, opts.ignore_label)
    layout = tf.ensure_shape(tf.where(valid, 0, -1), [s, s])  # Maps not read (augment.py).
    spo = nearest(sp, -1) if sp_b is not None else layout
    clo = nearest(cl, -1) if cl_b is not None else layout
    return img, m, spo, clo, index

  return fn


def batches(source: TrainSource, start_step: int, *, workers: int, prefetch: int):
  """Generator of batch dicts for global steps start_step, start_step + 1, ..."""
  per_host = len(source.positions(start_step))

  def stream():
    step = start_step
    while True:
      for g in source.positions(step):
        yield np.int32(source.order(g)), source.draws(g)
      step += 1

  ds = tf.data.Dataset.from_generator(
    stream,
    output_signature=(
      tf.TensorSpec([], tf.int32),
      tf.TensorSpec([augment.NUM_DRAWS], tf.float64),
    ),
  )
  ds = ds.map(
    _example_fn(source),
    num_parallel_calls=max(1, workers),
    deterministic=True,
  )
  ds = ds.batch(per_host, drop_remainder=True).prefetch(max(1, prefetch))
  options = tf.data.Options()
  options.threading.max_intra_op_parallelism = 1  # Parallel over examples, not inside ops.
  ds = ds.with_options(options)
  # The iterator is released here, on close or error, never left to interpreter shutdown: its
  # destructor there waits for a map thread that waits for the GIL of the generator above (a
  # hang after any fatal error). Hence also no TF error chained to what is raised: its traceback
  # would keep the iterator alive.
  it = iter(ds)
  try:
    step = start_step
    while True:
      failure = None
      try:
        img, m, sp, cl, idx = next(it)
      except tf.errors.OpError as e:
        failure = e.message
      if failure is not None:
        _diagnose(source, source.positions(step), failure)
      yield assemble(source.split, idx.numpy(), img.numpy(), m.numpy(), sp.numpy(), cl.numpy())
      step += 1
  finally:
    del it


def _diagnose(source: TrainSource, positions, message: str):
  """Re-runs the failing batch with the numpy loader to name the bad file; always raises."""
  for g in positions:  # Raises the DataError that names the file.
    load_example(source, g)
  raise RuntimeError(f"tf.data input pipeline failed: {message}")
