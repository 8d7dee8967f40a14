"""Qualitative grids: image | CAM per class | pseudo-label | prediction | ground truth.

Each panel has the image's size with a caption strip above it. CAMs are drawn as a jet heatmap
blended over the image, each scaled by its own maximum (a display choice only); label maps use
the VOC palette (`png.py`), ignore (255) showing as cream.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ssr_jax.eval.inference import resize_np
from ssr_jax.eval.png import colorize

_CAPTION_H = 14  # Pixels of the caption strip above each panel.


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


def _label_panel(labels, size) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != tuple(size):
    # Nearest resize keeps ids intact (label maps of another resolution, e.g. patch grids).
    rows = np.minimum((np.arange(size[0]) * labels.shape[0]) // size[0], labels.shape[0] - 1)
    cols = np.minimum((np.arange(size[1]) * labels.shape[1]) // size[1], labels.shape[1] - 1)
    labels = labels[rows][:, cols]
  return colorize(labels)


def _names_in(labels, class_names) -> str:
  ids = [int(v) for v in np.unique(np.asarray(labels)) if v != 255]
  if class_names is None:
    return ",".join(str(i) for i in ids)
  return ",".join(class_names[i] if i < len(class_names) else str(i) for i in ids)


def _captioned(panel: np.ndarray, text: str) -> np.ndarray:
  h, w = panel.shape[:2]
  strip = Image.new("RGB", (w, _CAPTION_H), (0, 0, 0))
  ImageDraw.Draw(strip).text((2, 1), text, fill=(255, 255, 255))
  return np.concatenate([np.asarray(strip), panel], axis=0)


def grid(
  image,
  cams: Mapping[str, np.ndarray],
  pseudo,
  pred,
  gt=None,
  class_names: Sequence[str] | None = None,
) -> np.ndarray:
  """One row of captioned panels, uint8 [H + 14, W * n_panels, 3].

  image: uint8 [H, W, 3]; cams: {class name: CAM [h, w] float} for the image's classes (any
  resolution); pseudo, pred, gt: label maps [H, W] (other sizes are nearest-resized); gt may be
  None. class_names name the ids listed in the label panels' captions.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"grid image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  size = image.shape[:2]
  panels = [_captioned(image, "image")]
  for name, cam in cams.items():
    panels.append(_captioned(cam_overlay(image, cam), f"cam {name}"))
  panels.append(_captioned(_label_panel(pseudo, size), f"pseudo {_names_in(pseudo, class_names)}"))
  panels.append(_captioned(_label_panel(pred, size), f"pred {_names_in(pred, class_names)}"))
  if gt is not None:
    panels.append(_captioned(_label_panel(gt, size), f"gt {_names_in(gt, class_names)}"))
  return np.concatenate(panels, axis=1)


def save_image(path, image) -> None:
  """Writes a uint8 [H, W, 3] image (e.g. a `grid`) as an RGB PNG (parent folders created)."""
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(image)).save(path, format="PNG")


def save_grid(path, image, cams, pseudo, pred, gt=None, class_names=None) -> None:
  """Writes `grid(...)` as an RGB PNG (parent folders created)."""
  save_image(path, grid(image, cams, pseudo, pred, gt, class_names))
