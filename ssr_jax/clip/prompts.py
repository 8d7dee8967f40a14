"""Zero-shot text classifiers from class names and prompt templates, and WeCLIP's name lists.

The name lists are WeCLIP's (method.md §1.2): a name may hold comma-separated synonyms, and the
whole string goes into the template ("a clean origami person with clothes,people,human.").
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax.clip.tokenizer import tokenize

VOC_FG = (
  "aeroplane",
  "bicycle",
  "bird avian",
  "boat",
  "bottle",
  "bus",
  "car",
  "cat",
  "chair seat",
  "cow",
  "diningtable",
  "dog",
  "horse",
  "motorbike",
  "person with clothes,people,human",
  "pottedplant",
  "sheep",
  "sofa",
  "train",
  "tvmonitor screen",
)
VOC_BG = (
  "ground",
  "land",
  "grass",
  "tree",
  "building",
  "wall",
  "sky",
  "lake",
  "water",
  "river",
  "sea",
  "railway",
  "railroad",
  "keyboard",
  "helmet",
  "cloud",
  "house",
  "mountain",
  "ocean",
  "road",
  "rock",
  "street",
  "valley",
  "bridge",
  "sign",
)
# COCO-2014 order, WeCLIP's synonyms and spellings kept verbatim ("sknowboard" included, §1.2).
COCO_FG = (
  "person with clothes,people,human",
  "bicycle",
  "car",
  "motorbike",
  "aeroplane",
  "bus",
  "train",
  "truck",
  "boat",
  "traffic light",
  "fire hydrant",
  "stop sign",
  "parking meter",
  "bench",
  "bird avian",
  "cat",
  "dog",
  "horse",
  "sheep",
  "cow",
  "elephant",
  "bear",
  "zebra",
  "giraffe",
  "backpack,bag",
  "umbrella,parasol",
  "handbag,purse",
  "necktie",
  "suitcase",
  "frisbee",
  "skis",
  "sknowboard",
  "sports ball",
  "kite",
  "baseball bat",
  "glove",
  "skateboard",
  "surfboard",
  "tennis racket",
  "bottle",
  "wine glass",
  "cup",
  "fork",
  "knife",
  "dessertspoon",
  "bowl",
  "banana",
  "apple",
  "sandwich",
  "orange",
  "broccoli",
  "carrot",
  "hot dog",
  "pizza",
  "donut",
  "cake",
  "chair seat",
  "sofa",
  "pottedplant",
  "bed",
  "diningtable",
  "toilet",
  "tvmonitor screen",
  "laptop",
  "mouse",
  "remote control",
  "keyboard",
  "cell phone",
  "microwave",
  "oven",
  "toaster",
  "sink",
  "refrigerator",
  "book",
  "clock",
  "vase",
  "scissors",
  "teddy bear",
  "hairdrier,blowdrier",
  "toothbrush",
)
COCO_BG = tuple(n for n in VOC_BG if n not in ("keyboard", "sign"))  # §1.2: K = 23.


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(model, params, ids):
  """ids int32 [n, L] -> L2-normalised text embeddings [n, D] float32."""
  e = model.apply({"params": params}, ids, method=type(model).encode_text).astype(jnp.float32)
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def text_classifier(
  model,
  params,
  class_names: Sequence[str],
  templates: str | Sequence[str],
  *,
  tokenize_fn=tokenize,
  context_length: int | None = None,
  batch_size: int = 256,
) -> np.ndarray:
  """Class text embeddings [C, D] float32, each unit-norm.

  Per class: every template (a format string with one "{}") is filled with the whole name,
  encoded, L2-normalised; the template embeddings are averaged and re-normalised (§1.2).
  Prompts are encoded in jitted chunks of at most batch_size (padded to a power of two so few
  shapes compile). params: the full CLIP params. context_length: token length (default: the
  model's; shorter is exact and cheaper as long as no prompt is cut).
  """
  templates = [templates] if isinstance(templates, str) else list(templates)
  if not templates or not class_names:
    raise ValueError("text_classifier needs at least one class name and one template")
  for t in templates:
    if t.count("{}") != 1:
      raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}'")
  prompts = [t.format(name) for name in class_names for t in templates]
  length = context_length or model.cfg.context_length
  if length > model.cfg.context_length:
    raise ValueError(f"context_length {length} exceeds the model's {model.cfg.context_length}")
  ids = np.asarray(tokenize_fn(prompts, context_length=length), np.int32)
  n = len(prompts)
  chunk = min(batch_size, 1 << (n - 1).bit_length())
  padded = np.zeros((-(-n // chunk) * chunk, ids.shape[1]), np.int32)
  padded[:n] = ids
  emb = np.concatenate(
    [
      np.asarray(_encode_text(model, params, padded[i : i + chunk]))
      for i in range(0, len(padded), chunk)
    ]
  )[:n]
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float32)
