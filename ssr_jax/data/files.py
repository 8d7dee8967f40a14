"""Reading and writing the per-image files of a segmentation dataset (TensorFlow-free).

Images decode to uint8 [H, W, 3] RGB (grayscale, palette and RGBA inputs are converted; alpha is
dropped as `PIL.Image.convert("RGB")` does); masks to uint8 [H, W] (0 background, 1..C-1 classes,
255 ignore); superpixel maps to int32 [H, W] (stored as lossless uint16 PNG), colour-cluster maps
to int32 [H, W] (stored as uint8 PNG). Every failure raises `DataError` naming the file and what
to do about it.
"""

import os

import numpy as np
from PIL import Image

IGNORE = 255


class DataError(ValueError):
  """A dataset file is missing, unreadable or inconsistent (the message names the file)."""


def read_image(path: str) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, 3] RGB; raises DataError naming a bad file."""
  try:
    with Image.open(path) as im:
      im.load()  # Forces the full decode so truncated files fail here, not later.
      if im.mode != "RGB":
        im = im.convert("RGB")
      return np.asarray(im, dtype=np.uint8)
  except FileNotFoundError:
    raise DataError(f"image file not found: {path}") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(
      f"cannot decode image {path} ({e}); the file is corrupt or truncated: re-extract it "
      "from the original archive"
    ) from None


def read_mask(path: str, num_classes: int) -> np.ndarray:
  """Decodes a label PNG to uint8 [H, W] and checks values are in 0..num_classes-1 or 255."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode not in ("L", "P"):
        raise DataError(
          f"mask {path} has PIL mode {im.mode!r}; expected a single-channel 8-bit PNG (mode L "
          "or P) whose values are class indices"
        )
      # Mode P is read as its raw indices (VOC's palette PNGs store class ids as indices).
      m = np.asarray(im, dtype=np.uint8)
  except FileNotFoundError:
    raise DataError(f"mask file not found: {path}") from None
  except (OSError, SyntaxError) as e:
    raise DataError(f"cannot decode mask {path} ({e}); re-extract or regenerate it") from None
  check_mask_values(m, num_classes, path)
  return m


def check_mask_values(mask: np.ndarray, num_classes: int, path: str) -> None:
  """Raises DataError if mask holds a value outside 0..num_classes-1 and 255."""
  bad = (mask >= num_classes) & (mask != IGNORE)
  if bad.any():
    vals = sorted(set(np.unique(mask[bad]).tolist()))
    raise DataError(
      f"mask {path} has values {vals[:10]} outside 0..{num_classes - 1} and {IGNORE}; "
      f"check data.num_classes ({num_classes}) and that the file is a class-index PNG"
    )


def read_superpixels(path: str) -> np.ndarray:
  """Decodes a uint16 superpixel PNG to int32 [H, W]; raises DataError naming a bad file."""
  try:
    with Image.open(path) as im:
      im.load()
      return np.asarray(im).astype(np.int32)
  except FileNotFoundError:
    raise DataError(
      f"superpixel file not found: {path}; precompute them with python -m "
      "ssr_jax.data.superpixels --config <your config>"
    ) from None
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(
      f"cannot decode superpixel file {path} ({e}); delete it and rerun python -m "
      "ssr_jax.data.superpixels (it skips valid files)"
    ) from None


def read_clusters(path: str) -> np.ndarray:
  """Decodes a uint8 colour-cluster PNG to int32 [H, W]; raises DataError naming a bad file."""
  try:
    with Image.open(path) as im:
      im.load()
      mode, m = im.mode, np.asarray(im)
  except FileNotFoundError:
    raise DataError(
      f"colour-cluster file not found: {path}; precompute it with python -m "
      "ssr_jax.data.superpixels --config <your config> (it adds missing clusters)"
    ) from None
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(
      f"cannot decode colour-cluster file {path} ({e}); delete it and rerun python -m "
      "ssr_jax.data.superpixels (it skips valid files)"
    ) from None
  if mode != "L":
    raise DataError(
      f"colour-cluster file {path} has PIL mode {mode!r}, not L (uint8); delete it and rerun "
      "python -m ssr_jax.data.superpixels"
    )
  return m.astype(np.int32)


def image_size(path: str) -> tuple[int, int]:
  """(H, W) of an image file from its header only (no full decode)."""
  try:
    with Image.open(path) as im:
      return im.size[1], im.size[0]
  except FileNotFoundError:
    raise DataError(f"file not found: {path}") from None
  except (OSError, SyntaxError) as e:
    raise DataError(f"cannot read the header of {path} ({e}); the file is corrupt") from None


def write_png(path: str, array: np.ndarray) -> None:
  """Writes uint8 [H, W] (mode L) or uint16 [H, W] (16-bit) losslessly, atomically.

  Mode L, not P: Pillow re-indexes palette images written without a palette (environment.md
  pitfall 5). The temporary-then-rename write keeps interrupted runs from leaving partial files.
  """
  if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
    raise TypeError(f"write_png takes uint8 or uint16 [H, W], got {array.dtype} {array.shape}")
  im = Image.fromarray(array)  # uint8 -> mode L, uint16 -> mode I;16.
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  im.save(tmp, format="PNG")
  os.replace(tmp, path)
