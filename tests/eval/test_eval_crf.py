"""Dense CRF wrapper: plumbing (layout, H/W order) and effect; skipped without pydensecrf2."""

import sys

import numpy as np
import pytest

from ssr_jax.eval import crf


def test_missing_package_message(monkeypatch):
  monkeypatch.setitem(sys.modules, "pydensecrf", None)
  monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
  with pytest.raises(ImportError, match="pip install pydensecrf2==1.1"):
    crf.dense_crf(np.zeros((2, 3, 3), np.uint8), np.full((2, 3, 2), 0.5, np.float32))


def test_zero_pairwise_returns_unary_softmax():
  pytest.importorskip("pydensecrf.densecrf")
  rng = np.random.default_rng(0)
  h, w, c = 7, 11, 4  # Non-square, so a swapped H/W or channel layout shows.
  probs = crf.softmax_np(rng.standard_normal((h, w, c)) * 3)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  q = crf.dense_crf(image, probs, pos_w=0.0, bi_w=0.0)
  clipped = np.maximum(probs, 1e-5)
  np.testing.assert_allclose(q, clipped / clipped.sum(-1, keepdims=True), atol=1e-5)


def test_crf_cleans_noise_along_colour_edges():
  pytest.importorskip("pydensecrf.densecrf")
  rng = np.random.default_rng(1)
  h, w = 40, 60
  truth = np.zeros((h, w), np.int64)
  truth[:, 25:] = 1
  image = np.where(truth[..., None] == 1, [200, 40, 40], [30, 30, 160]).astype(np.uint8)
  logits = np.stack([truth == 0, truth == 1], -1) * 1.0 + rng.standard_normal((h, w, 2)) * 1.2
  noisy = logits.argmax(-1)
  pred = crf.crf_predict(image, logits[::2, ::2])  # Low-res logits, resized inside.
  assert pred.shape == (h, w) and pred.dtype == np.int32
  assert (noisy == truth).mean() < 0.85
  assert (pred == truth).mean() > 0.98
