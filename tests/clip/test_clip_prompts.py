"""Text classifiers and WeCLIP's name lists."""

import jax
import numpy as np
import pytest

from configs import base
from ssr_jax import testing
from ssr_jax.clip import CLIP, init_params
from ssr_jax.clip.prompts import COCO_BG, COCO_FG, VOC_BG, VOC_FG, text_classifier

CFG = testing.tiny_clip_config(context_length=12, text_layers=2)


def _fake_tokenize(texts, context_length):
  """Deterministic per-text ids in [1, 62] ending with EOT 63 (the argmax)."""
  out = np.zeros((len(texts), context_length), np.int32)
  for i, t in enumerate(texts):
    body = [1 + (sum(map(ord, t[: j + 1])) * 7) % 62 for j in range(min(len(t), 8))]
    out[i, : len(body) + 1] = body + [63]
  return out


def test_text_classifier_matches_loop():
  model = CLIP(CFG)
  params = init_params(model, jax.random.key(0))
  names = ["cat", "person with clothes,people,human", "tvmonitor screen"]
  templates = ["a clean origami {}.", "a photo of a {}", "{}"]
  got = text_classifier(model, params, names, templates, tokenize_fn=_fake_tokenize, batch_size=4)
  assert got.shape == (3, 16) and got.dtype == np.float32
  want = []
  for name in names:  # Oracle: one prompt at a time, unjitted.
    embs = []
    for t in templates:
      ids = _fake_tokenize([t.format(name)], CFG.context_length)
      e = np.asarray(model.apply({"params": params}, ids, method=CLIP.encode_text))[0]
      embs.append(e / np.linalg.norm(e))
    m = np.mean(embs, axis=0)
    want.append(m / np.linalg.norm(m))
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)
  # Causal attention: dropping trailing padding (a shorter context) changes nothing.
  short = text_classifier(
    model, params, names, templates, tokenize_fn=_fake_tokenize, context_length=10
  )
  np.testing.assert_allclose(short, got, rtol=1e-5, atol=1e-6)
  # A single template string is accepted and is the normalised embedding itself.
  one = text_classifier(model, params, names, "{}", tokenize_fn=_fake_tokenize)
  assert np.allclose(np.linalg.norm(one, axis=-1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="exactly one"):
    text_classifier(model, params, names, "no slot", tokenize_fn=_fake_tokenize)


def test_name_lists():
  c = base.get_config()
  assert tuple(c.model.class_names) == VOC_FG and tuple(c.model.bg_names) == VOC_BG
  # WeCLIP's synonyms (method §1.2), in VOC class order.
  assert (VOC_FG[2], VOC_FG[8], VOC_FG[14], VOC_FG[19]) == (
    "bird avian",
    "chair seat",
    "person with clothes,people,human",
    "tvmonitor screen",
  )
  assert VOC_BG[:3] == ("ground", "land", "grass") and VOC_BG[-1] == "sign"
  assert len(VOC_FG) == 20 and len(VOC_BG) == 25
  assert len(COCO_FG) == len(set(COCO_FG)) == 80 and len(COCO_BG) == 23
  assert set(VOC_BG) - set(COCO_BG) == {"keyboard", "sign"}
  for name in (
    "person with clothes,people,human",
    "sknowboard",
    "dessertspoon",
    "hairdrier,blowdrier",
    "remote control",
    "necktie",
    "glove",
  ):
    assert name in COCO_FG
  assert COCO_FG[0].startswith("person") and COCO_FG[-1] == "toothbrush"
