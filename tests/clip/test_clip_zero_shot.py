"""Zero-shot scoring of the tiny CLIP (ssr_jax.clip.pretrain): image-level mAP against a hand
computation, and the scores' agreement with the accuracy."""

import jax
import numpy as np
import pytest

from ssr_jax.clip import pretrain
from ssr_jax.clip.model import CLIP, init_params
from ssr_jax.testing import TINY_TEXT_CLIP


def test_mean_average_precision_by_hand():
  scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
  labels = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
  # Class 0 ranks images 0, 1, 2, 3: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2.
  # Class 1 ranks images 3, 1, 2, 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2.
  assert pretrain.mean_average_precision(scores, labels) == pytest.approx(5 / 6)
  perfect = np.array([[1.0, 0.0], [0.0, 0.0], [0.9, 0.8], [0.0, 1.0]])
  assert pretrain.mean_average_precision(perfect, labels) == pytest.approx(1.0)
  # A class without positives is left out of the mean.
  no_pos = np.concatenate([labels[:, :1], np.zeros((4, 1), int)], axis=1)
  assert pretrain.mean_average_precision(scores, no_pos) == pytest.approx(5 / 6)


def test_zero_shot_scores_are_cosines_and_give_the_accuracy():
  cfg = TINY_TEXT_CLIP
  model = CLIP(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  names = ("boat", "horse", "car")
  args = (model, params, images)
  s = pretrain.zero_shot_scores(*args, names, "a photo of a {}.", "clip")
  assert s.shape == (5, 3) and np.all(np.abs(s) <= 1 + 1e-5)
  labels = np.zeros((5, 3))
  labels[np.arange(5), s.argmax(-1)] = 1  # Every top class present.
  assert pretrain.zero_shot_accuracy(*args, labels, names, "a photo of a {}.", "clip") == 1.0
  assert pretrain.zero_shot_accuracy(*args, 1 - labels, names, "a photo of a {}.", "clip") == 0.0
