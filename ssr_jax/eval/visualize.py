"""Qualitative grids: image | CAM per class | pseudo-label | prediction | ground truth, + legend.

Small images are enlarged (integer factor, nearest neighbour) so that every panel's shorter side
is at least MIN_TILE pixels: the demo's 96 px images are unreadable otherwise. Each panel has a
caption above it, wrapped at word boundaries to the panel's width (all captions of a row share
the height of the longest). Below the row, a legend names the colour of every class that
appears in a label panel. CAMs are drawn as a jet heatmap blended over the image, each scaled by
its own maximum (a display choice only); label maps use the VOC palette (`png.py`), ignore (255)
showing as cream.
"""

import functools
import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ssr_jax.data import files
from ssr_jax.eval.inference import resize_np
from ssr_jax.eval.png import VOC_PALETTE, colorize

MIN_TILE = 192  # Shorter side of a panel after enlarging small images.
MAX_UPSCALE = 8
FONT_SIZE = 13
_PAD = 3  # Pixels around caption and legend text.
_SWATCH = 12  # Side of a legend colour square.
GAP = 4  # White pixels between panels.
IGNORE = 255


@functools.cache
def font():
  """PIL's bundled font at FONT_SIZE (its small bitmap font if FreeType is missing)."""
  try:
    return ImageFont.load_default(size=FONT_SIZE)
  except (TypeError, OSError, ImportError):
    return ImageFont.load_default()


def _line_height() -> int:
  return int(font().getbbox("Ag")[3]) + 2


def upscale_factor(size) -> int:
  """Integer enlargement of an image of `size` (H, W): shorter side >= MIN_TILE, at most 8x."""
  return int(min(MAX_UPSCALE, max(1, -(-MIN_TILE // max(1, min(size))))))


def _enlarge(x: np.ndarray, k: int) -> np.ndarray:
  return x if k == 1 else np.repeat(np.repeat(x, k, axis=0), k, axis=1)


def wrap_text(text: str, width: float) -> list[str]:
  """Lines of `text` no wider than `width` pixels, broken between words only; a single word
  wider than a line is shortened with an ellipsis."""
  f, lines, line = font(), [], ""
  for word in text.split():
    candidate = f"{line} {word}" if line else word
    if f.getlength(candidate) <= width:
      line = candidate
      continue
    if line:
      lines.append(line)
    while len(word) > 1 and f.getlength(word) > width:
      word = word[:-2] + "…" if word.endswith("…") else word[:-1] + "…"
    line = word
  return lines + [line] if line else lines


def jet(x) -> np.ndarray:
  """Jet colour map of x in [0, 1] (clipped), uint8 [..., 3] (0 -> dark blue, 1 -> dark red)."""
  x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)
  r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
  g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
  b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
  return np.rint(np.stack([r, g, b], -1) * 255).astype(np.uint8)


def cam_overlay(image, cam, alpha: float = 0.5) -> np.ndarray:
  """uint8 [H, W, 3]: a CAM [h, w] (any resolution, resized bilinearly) as a heatmap over image."""
  image = np.asarray(image)
  cam = resize_np(np.asarray(cam, np.float32)[..., None], image.shape[:2])[..., 0]
  peak = cam.max()
  cam = cam / peak if peak > 0 else cam
  mix = (1 - alpha) * image.astype(np.float32) + alpha * jet(cam)
  return np.clip(np.rint(mix), 0, 255).astype(np.uint8)


def _nearest(labels, size) -> np.ndarray:
  """Label map [h, w] resized to `size` by nearest neighbour (ids kept intact)."""
  labels = np.asarray(labels)
  if labels.shape == tuple(size):
    return labels
  rows = np.minimum((np.arange(size[0]) * labels.shape[0]) // size[0], labels.shape[0] - 1)
  cols = np.minimum((np.arange(size[1]) * labels.shape[1]) // size[1], labels.shape[1] - 1)
  return labels[rows][:, cols]


def _name(i: int, class_names) -> str:
  if i == IGNORE:
    return "ignore"
  if class_names is None or i >= len(class_names):
    return str(i)
  return str(class_names[i])


def _ids(labels) -> list[int]:
  return [int(v) for v in np.unique(np.asarray(labels))]


def _names_in(labels, class_names) -> str:
  return ", ".join(_name(i, class_names) for i in _ids(labels) if i != IGNORE)


def _captioned(panel: np.ndarray, lines: Sequence[str], height: int) -> np.ndarray:
  w = panel.shape[1]
  strip = Image.new("RGB", (w, height), (0, 0, 0))
  draw, step = ImageDraw.Draw(strip), _line_height()
  for n, line in enumerate(lines):
    draw.text((_PAD, _PAD + n * step), line, fill=(255, 255, 255), font=font())
  return np.concatenate([np.asarray(strip), panel], axis=0)


def legend(ids: Sequence[int], class_names, width: int) -> np.ndarray:
  """uint8 [h, width, 3]: a colour square and the name of each label id, wrapped into rows."""
  f, step = font(), max(_line_height(), _SWATCH) + _PAD
  items, x, y = [], _PAD, _PAD
  for i in ids:
    name = _name(i, class_names)
    w = _SWATCH + 4 + int(np.ceil(f.getlength(name))) + 12
    if x > _PAD and x + w > width:
      x, y = _PAD, y + step
    items.append((x, y, i, name))
    x += w
  out = Image.new("RGB", (width, y + step + _PAD), (255, 255, 255))
  draw = ImageDraw.Draw(out)
  for x, y, i, name in items:
    colour = tuple(int(c) for c in VOC_PALETTE[i % len(VOC_PALETTE)])
    draw.rectangle([x, y, x + _SWATCH - 1, y + _SWATCH - 1], fill=colour, outline=(0, 0, 0))
    draw.text((x + _SWATCH + 4, y - 1), name, fill=(0, 0, 0), font=f)
  return np.asarray(out)


def grid(
  image,
  cams: Mapping[str, np.ndarray],
  pseudo,
  pred,
  gt=None,
  class_names: Sequence[str] | None = None,
) -> np.ndarray:
  """n captioned panels in a row above a colour legend.

  Returns uint8 [caption + k*H + legend, n * (k*W + GAP) - GAP, 3].

  image: uint8 [H, W, 3], enlarged k = upscale_factor((H, W)) times; cams: {class name: CAM
  [h, w] float} for the image's classes (any resolution); pseudo, pred, gt: label maps [H, W]
  (other sizes are nearest-resized); gt may be None. class_names name the label ids in the
  captions and the legend.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"grid image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  size = image.shape[:2]
  k = upscale_factor(size)
  big = _enlarge(image, k)
  panels = [("image", big)]
  for name, cam in cams.items():
    panels.append((f"cam {name}", cam_overlay(big, cam)))
  maps = [("pseudo", pseudo), ("pred", pred)] + ([("gt", gt)] if gt is not None else [])
  for title, labels in maps:
    labels = _nearest(labels, size)
    panels.append((f"{title}: {_names_in(labels, class_names)}", _enlarge(colorize(labels), k)))
  width = big.shape[1] - 2 * _PAD
  wrapped = [wrap_text(title, width) for title, _ in panels]
  height = max(len(lines) for lines in wrapped) * _line_height() + 2 * _PAD
  tiles = [_captioned(p, lines, height) for (_, p), lines in zip(panels, wrapped)]
  gap = np.full((tiles[0].shape[0], GAP, 3), 255, np.uint8)
  row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
  ids = sorted(set().union(*(_ids(_nearest(m, size)) for _, m in maps)))
  return np.concatenate([row, legend(ids, class_names, row.shape[1])], axis=0)


# Confusion heatmap: share 0 white, share 1 dark blue; rows of classes absent from the ground
# truth grey.
_LOW, _HIGH, _ABSENT = np.array([255, 255, 255]), np.array([8, 48, 107]), (200, 200, 200)
CELL = 30  # Side of a heatmap cell in pixels (fits "100").


def share_colour(share) -> np.ndarray:
  """uint8 [..., 3]: the heatmap colour of row shares in [0, 1] (linear white -> dark blue)."""
  x = np.clip(np.asarray(share, np.float64), 0.0, 1.0)[..., None]
  return np.rint(_LOW + x * (_HIGH - _LOW)).astype(np.uint8)


def confusion_heatmap(shares, class_names: Sequence[str], title: str = "") -> np.ndarray:
  """uint8 [H, W, 3]: a row-normalised confusion matrix as a heatmap with the share in percent in
  each cell, ground-truth classes down the left, predicted classes (rotated) along the top.

  shares: float [C, C] (metrics.row_shares; NaN rows drawn grey with "-").
  """
  shares = np.asarray(shares, np.float64)
  c = shares.shape[0]
  f, lh = font(), _line_height()
  names = [str(n) for n in class_names]
  label_w = int(max(f.getlength(n) for n in names + ["ground truth"])) + 2 * _PAD
  head_h = label_w  # Column labels are the row labels rotated.
  title = title or "rows: ground truth, columns: prediction; % of the row's pixels"
  lines = wrap_text(title, max(label_w + c * CELL - 2 * _PAD, 120))
  top = len(lines) * lh + 2 * _PAD
  width = max(label_w + c * CELL, 120) + _PAD
  out = Image.new("RGB", (width, top + head_h + c * CELL + _PAD), (255, 255, 255))
  draw = ImageDraw.Draw(out)
  for n, line in enumerate(lines):
    draw.text((_PAD, _PAD + n * lh), line, fill=(0, 0, 0), font=f)
  strip = Image.new("RGB", (head_h, c * CELL), (255, 255, 255))  # Column labels, then rotated.
  sd = ImageDraw.Draw(strip)
  for j, name in enumerate(names):  # Row j becomes column j, read upwards from the cells.
    sd.text((_PAD, j * CELL + (CELL - lh) // 2), name, fill=(0, 0, 0), font=f)
  out.paste(strip.rotate(90, expand=True), (label_w, top))
  y0 = top + head_h
  for i in range(c):
    draw.text((_PAD, y0 + i * CELL + (CELL - lh) // 2), names[i], fill=(0, 0, 0), font=f)
    for j in range(c):
      x, y, v = label_w + j * CELL, y0 + i * CELL, shares[i, j]
      fill = _ABSENT if np.isnan(v) else tuple(int(k) for k in share_colour(v))
      draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=fill)
      text = "-" if np.isnan(v) else f"{100 * v:.0f}"
      ink = (255, 255, 255) if not np.isnan(v) and v > 0.5 else (0, 0, 0)
      tw = f.getlength(text)
      draw.text((x + (CELL - tw) / 2, y + (CELL - lh) / 2), text, fill=ink, font=f)
  return np.asarray(out)


def save_image(path, image) -> None:
  """Writes a uint8 [H, W, 3] image (e.g. a `grid`) as an RGB PNG (parent folders created)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buf, format="PNG")
  files.write_bytes(path, buf.getvalue())  # Parent folders created; local or gs://.


def save_grid(path, image, cams, pseudo, pred, gt=None, class_names=None) -> None:
  """Writes `grid(...)` as an RGB PNG (parent folders created)."""
  save_image(path, grid(image, cams, pseudo, pred, gt, class_names))
