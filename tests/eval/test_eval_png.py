"""Label PNG round trips (Pillow pitfall 5), palette, overlay and visualisation grids."""

import numpy as np
import pytest
from PIL import Image

from ssr_jax.eval import visualize
from ssr_jax.eval.png import VOC_PALETTE, load_label_png, overlay, save_label_png
from ssr_jax.eval.visualize import grid, jet, save_grid


def _ids_map():
  ids = np.array(list(range(21)) + [255], np.uint8)
  return np.tile(ids, (3, 2))  # [3, 44] holding every id.


@pytest.mark.parametrize("palette", [VOC_PALETTE, None])
def test_round_trip_preserves_ids(tmp_path, palette):
  labels = _ids_map()
  path = tmp_path / "sub" / "a.png"
  save_label_png(path, labels, palette=palette)
  np.testing.assert_array_equal(load_label_png(path), labels)
  with Image.open(path) as im:  # Independent read: stored pixel values are the ids.
    assert im.mode == ("P" if palette is not None else "L")
    np.testing.assert_array_equal(np.array(im), labels)
    if palette is not None:
      pal = np.array(im.getpalette()).reshape(-1, 3)
      assert tuple(pal[1]) == (128, 0, 0) and tuple(pal[15]) == (192, 128, 128)
      assert tuple(pal[255]) == (224, 224, 192)


def test_voc_palette_known_entries():
  assert VOC_PALETTE.shape == (256, 3)
  assert tuple(VOC_PALETTE[0]) == (0, 0, 0)
  assert tuple(VOC_PALETTE[2]) == (0, 128, 0) and tuple(VOC_PALETTE[20]) == (0, 64, 128)


def test_load_rejects_rgb_and_reads_16_bit(tmp_path):
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
  with pytest.raises(ValueError, match="rgb.png.*not a label map"):
    load_label_png(tmp_path / "rgb.png")
  Image.fromarray(np.array([[3, 255]], np.uint16)).save(tmp_path / "i16.png")
  np.testing.assert_array_equal(load_label_png(tmp_path / "i16.png"), [[3, 255]])
  with pytest.raises(ValueError, match="0..255"):
    save_label_png(tmp_path / "x.png", np.array([[256]]))


def test_overlay_hand_computed():
  image = np.full((1, 2, 3), 100, np.uint8)
  out = overlay(image, np.array([[0, 1]]), alpha=0.25)
  np.testing.assert_array_equal(out[0, 0], [75, 75, 75])  # 0.75 * 100 + 0.25 * 0
  np.testing.assert_array_equal(out[0, 1], [107, 75, 75])  # 0.75 * 100 + 0.25 * 128 = 107


def test_grid_layout_and_save(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
  pred = rng.integers(0, 21, (24, 32))
  pseudo = pred.copy()
  pseudo[:4] = 255
  cams = {"cat": rng.random((5, 8)), "dog": rng.random((24, 32))}
  names = [f"c{i}" for i in range(21)]
  g = grid(image, cams, pseudo, pred, gt=pred, class_names=names)
  k = visualize.upscale_factor((24, 32))
  assert k == 8  # Shorter side 24 -> 192 = MIN_TILE; panels 192 x 256.
  tile = 256 + visualize.GAP
  assert g.dtype == np.uint8 and g.shape[1] == 6 * tile - visualize.GAP
  big = np.repeat(np.repeat(image, k, 0), k, 1)
  top = next(t for t in range(g.shape[0] - 192) if np.array_equal(g[t : t + 192, :256], big))
  assert g[:top, :256].max() > 0  # A caption was drawn above the image.
  pred_big = np.repeat(np.repeat(VOC_PALETTE[pred], k, 0), k, 1)
  np.testing.assert_array_equal(g[top : top + 192, 4 * tile : 4 * tile + 256], pred_big)
  cream = np.broadcast_to([224, 224, 192], (32, 256, 3))  # Ignore rows of the pseudo-label.
  np.testing.assert_array_equal(g[top : top + 32, 3 * tile : 3 * tile + 256], cream)
  below = g[top + 192 :]  # The legend: a swatch of every class in a label panel, and ignore.
  for c in list(np.unique(pred)) + [255]:
    assert (below == VOC_PALETTE[c]).all(-1).sum() >= 100, c
  assert grid(image, {}, pseudo, pred).shape[1] == 3 * tile - visualize.GAP
  np.testing.assert_array_equal(jet(np.array([0.0, 1.0])), [[0, 0, 128], [128, 0, 0]])
  save_grid(tmp_path / "g.png", image, cams, pseudo, pred, None, names)
  with Image.open(tmp_path / "g.png") as im:
    assert im.size[0] == 5 * tile - visualize.GAP


def test_captions_wrap_between_words():
  title = "pred: background, aeroplane, diningtable, motorbike, pottedplant, tvmonitor"
  lines = visualize.wrap_text(title, 120)
  assert len(lines) > 1 and " ".join(lines) == title  # Whole words, none lost or cut.
  assert all(visualize.font().getlength(line) <= 120 for line in lines)
  (long,) = visualize.wrap_text("supercalifragilisticexpialidocious", 40)
  assert long.endswith("…") and visualize.font().getlength(long) <= 40
  assert visualize.upscale_factor((500, 375)) == 1 and visualize.upscale_factor((10, 10)) == 8
