"""Reading and writing the per-image files of a segmentation dataset (TensorFlow-free).

Images decode to uint8 [H, W, 3] RGB (grayscale, palette and RGBA inputs are converted; alpha is
dropped as `PIL.Image.convert("RGB")` does); masks to uint8 [H, W] (0 background, 1..C-1 classes,
255 ignore); superpixel maps to int32 [H, W] (stored as lossless uint16 PNG), colour-cluster maps
to int32 [H, W] (stored as uint8 PNG). Every failure raises `DataError` naming the file and what
to do about it. Each reader is `decode_*(bytes)` of `read_bytes(path)`, so the folder source and
a TFDS build (which stores the same bytes) decode identically. Paths go through `etils.epath`:
local or gs://.
"""

import io
import os

import numpy as np
from etils import epath
from PIL import Image

IGNORE = 255


class DataError(ValueError):
  """A dataset file is missing, unreadable or inconsistent (the message names the file)."""


def read_bytes(path) -> bytes:
  """The bytes of a file, local or remote (`etils.epath`: gs:// works wherever a path does).

  Raises FileNotFoundError for a missing file, which callers turn into a DataError.
  """
  return epath.Path(path).read_bytes()


_MISSING_HINT = {
  "superpixel": "; precompute them with python -m ssr_jax.data.superpixels --config <your config>",
  "colour-cluster": (
    "; precompute it with python -m ssr_jax.data.superpixels --config <your config> (it adds "
    "missing clusters)"
  ),
}


def read_kind(path, kind: str) -> bytes:
  """read_bytes of an image, mask, superpixel or colour-cluster file; DataError if missing."""
  try:
    return read_bytes(path)
  except FileNotFoundError:
    raise DataError(f"{kind} file not found: {path}{_MISSING_HINT.get(kind, '')}") from None


def read_image(path) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, 3] RGB; raises DataError naming a bad file."""
  return decode_image(read_kind(path, "image"), f"image {path}")


def decode_image(data: bytes, name: str, remedy: str = "") -> np.ndarray:
  """Encoded JPEG/PNG bytes -> uint8 [H, W, 3] RGB; `name` says where they came from in errors."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Forces the full decode so truncated files fail here, not later.
      if im.mode != "RGB":
        im = im.convert("RGB")
      return np.asarray(im, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(
      f"cannot decode {name} ({e}); "
      + (remedy or "the file is corrupt or truncated: re-extract it from the original archive")
    ) from None


def read_mask(path, num_classes: int) -> np.ndarray:
  """Decodes a label PNG to uint8 [H, W] and checks values are in 0..num_classes-1 or 255."""
  return decode_mask(read_kind(path, "mask"), num_classes, f"mask {path}")


def decode_mask(data: bytes, num_classes: int, name: str, remedy: str = "") -> np.ndarray:
  """Label PNG bytes -> uint8 [H, W] class indices, values checked (see read_mask)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode not in ("L", "P"):
        raise DataError(
          f"{name} has PIL mode {im.mode!r}; expected a single-channel 8-bit PNG (mode L "
          "or P) whose values are class indices"
        )
      # Mode P is read as its raw indices (VOC's palette PNGs store class ids as indices).
      m = np.asarray(im, dtype=np.uint8)
  except (OSError, SyntaxError) as e:
    raise DataError(
      f"cannot decode {name} ({e}); {remedy or 're-extract or regenerate it'}"
    ) from None
  check_mask_values(m, num_classes, name)
  return m


def check_mask_values(mask: np.ndarray, num_classes: int, name: str) -> None:
  """Raises DataError if mask holds a value outside 0..num_classes-1 and 255."""
  bad = (mask >= num_classes) & (mask != IGNORE)
  if bad.any():
    vals = sorted(set(np.unique(mask[bad]).tolist()))
    raise DataError(
      f"{name} has values {vals[:10]} outside 0..{num_classes - 1} and {IGNORE}; "
      f"check data.num_classes ({num_classes}) and that the file is a class-index PNG"
    )


def check_same_size(label_hw, image_hw, label_name, image_name):
  """DataError unless a map's (H, W) equals its image's."""
  if tuple(label_hw) != tuple(image_hw):
    raise DataError(
      f"{label_name} is {label_hw[0]}x{label_hw[1]} but {image_name} is "
      f"{image_hw[0]}x{image_hw[1]} (H x W); they must match"
    )


def read_superpixels(path) -> np.ndarray:
  """Decodes a uint16 superpixel PNG to int32 [H, W]; raises DataError naming a bad file."""
  return decode_superpixels(read_kind(path, "superpixel"), f"superpixel file {path}")


def decode_superpixels(data: bytes, name: str, remedy: str = "") -> np.ndarray:
  """uint16 superpixel PNG bytes -> int32 [H, W]."""
  remedy = remedy or "delete it and rerun python -m ssr_jax.data.superpixels (it skips valid files)"
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return np.asarray(im).astype(np.int32)
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"cannot decode {name} ({e}); {remedy}") from None


def read_clusters(path) -> np.ndarray:
  """Decodes a uint8 colour-cluster PNG to int32 [H, W]; raises DataError naming a bad file."""
  return decode_clusters(read_kind(path, "colour-cluster"), f"colour-cluster file {path}")


def decode_clusters(data: bytes, name: str, remedy: str = "") -> np.ndarray:
  """uint8 colour-cluster PNG bytes -> int32 [H, W]."""
  remedy = remedy or "delete it and rerun python -m ssr_jax.data.superpixels (it skips valid files)"
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      mode, m = im.mode, np.asarray(im)
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"cannot decode {name} ({e}); {remedy}") from None
  if mode != "L":
    raise DataError(f"{name} has PIL mode {mode!r}, not L (uint8); {remedy}")
  return m.astype(np.int32)


def image_size(path) -> tuple[int, int]:
  """(H, W) of an image file from its header only (no full decode)."""
  try:
    with epath.Path(path).open("rb") as f, Image.open(f) as im:
      return im.size[1], im.size[0]
  except FileNotFoundError:
    raise DataError(f"file not found: {path}") from None
  except (OSError, SyntaxError) as e:
    raise DataError(f"cannot read the header of {path} ({e}); the file is corrupt") from None


def encoded_image_size(data: bytes, name: str) -> tuple[int, int]:
  """(H, W) of encoded JPEG/PNG bytes from the header only; `name` says where they came from."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.size[1], im.size[0]
  except (OSError, SyntaxError) as e:
    raise DataError(f"cannot read the header of {name} ({e}); the file is corrupt") from None


def write_bytes(path, data: bytes) -> None:
  """Writes a file so that readers never see it half-written, creating its folder.

  Local files go through a temporary name and a rename (an interrupted run leaves no partial
  file); object stores (gs://) publish an object only when its upload completes.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if "://" in str(path):
    path.write_bytes(data)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def encode_png(array: np.ndarray) -> bytes:
  """Lossless PNG bytes of uint8 [H, W] (mode L) or uint16 [H, W] (16-bit).

  Mode L, not P: Pillow re-indexes palette images written without a palette (environment.md
  pitfall 5).
  """
  if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
    raise TypeError(f"write_png takes uint8 or uint16 [H, W], got {array.dtype} {array.shape}")
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")  # uint8 -> mode L, uint16 -> mode I;16.
  return buf.getvalue()


def write_png(path, array: np.ndarray) -> None:
  """Writes uint8 [H, W] or uint16 [H, W] losslessly (encode_png), atomically (write_bytes)."""
  write_bytes(path, encode_png(array))
