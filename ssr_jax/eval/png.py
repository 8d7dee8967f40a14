"""Label-map PNG I/O and colouring.

Label PNGs store class ids as 8-bit pixel values: a palette ("P") PNG whose indices are the ids
and whose palette is the VOC colour map, as the VOC SegmentationClass files. Pillow 13 re-indexes
a "P" image made by `Image.fromarray(a, mode="P")` without a palette (environment.md pitfall 5),
so we build a grayscale image and attach the palette with `putpalette`, which keeps the indices.
"""

import io

import numpy as np
from PIL import Image

from ssr_jax.data import files


def voc_palette(n: int = 256) -> np.ndarray:
  """The standard PASCAL VOC bit-interleaved colour map, uint8 [n, 3] (255 -> (224, 224, 192))."""
  pal = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  return pal


VOC_PALETTE = voc_palette()
VOC_PALETTE.flags.writeable = False


def save_label_png(path, labels, palette=VOC_PALETTE) -> None:
  """Writes labels [H, W] (ids 0..255) as a palette PNG (or grayscale with palette=None).

  The stored pixel values are exactly the ids; the palette only affects how viewers show them.
  """
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f"label map must be [H, W], got shape {labels.shape} for {path}")
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise ValueError(
      f"label ids must be in 0..255 for an 8-bit PNG, got range "
      f"{labels.min()}..{labels.max()} for {path}"
    )
  im = Image.fromarray(labels.astype(np.uint8))  # Mode "L": pixel values are the ids.
  if palette is not None:
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)
    im.putpalette(pal.ravel().tolist())  # "L" -> "P", indices unchanged.
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  files.write_bytes(path, buf.getvalue())  # Parent folders created; local or gs://.


def load_label_png(path) -> np.ndarray:
  """Reads an 8-bit label PNG ("P" or "L"; 16-bit grayscale if values fit) as uint8 [H, W].

  Raises ValueError for colour (RGB) PNGs: their colours are not class ids.
  """
  with Image.open(io.BytesIO(files.read_bytes(path))) as im:
    mode = im.mode
    if mode in ("P", "L"):
      return np.array(im, dtype=np.uint8)  # "P" gives palette indices, i.e. the ids.
    if mode in ("I", "I;16", "I;16B", "I;16L"):
      a = np.array(im)
      if a.min() < 0 or a.max() > 255:
        raise ValueError(f"{path}: {mode} label PNG has values outside 0..255")
      return a.astype(np.uint8)
  raise ValueError(
    f"{path}: PNG mode {mode!r} is not a label map; expected a single-channel palette ('P') "
    "or grayscale ('L') PNG whose pixel values are class ids (colour-coded RGB masks must be "
    "converted first)"
  )


def colorize(labels, palette=VOC_PALETTE) -> np.ndarray:
  """uint8 [H, W, 3] colours of labels [H, W] (ids index the palette)."""
  pal = np.asarray(palette, np.uint8).reshape(-1, 3)
  return pal[np.asarray(labels).astype(np.int64) % len(pal)]


def overlay(image, labels, alpha: float = 0.5, palette=VOC_PALETTE) -> np.ndarray:
  """uint8 [H, W, 3]: (1 - alpha) * image + alpha * palette colour of labels [H, W]."""
  image = np.asarray(image)
  if image.shape[:2] != np.asarray(labels).shape:
    raise ValueError(
      f"image {image.shape[:2]} and labels {np.asarray(labels).shape} differ in size"
    )
  mix = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(labels, palette)
  return np.clip(np.rint(mix), 0, 255).astype(np.uint8)
