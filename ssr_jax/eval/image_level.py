"""What evaluation reports from image-level labels alone (folder datasets, with or without masks).

- zero-shot: frozen CLIP's image embedding (its class token through the visual projection) against
  the classes' text embeddings, cosine per class: CLIP's own multi-label ranking, the reference
  any trained model should beat;
- seg classification: the share of an image's pixels the decoder assigns to each class, a
  classifier derived from the segmentation (a class it never predicts scores 0).
Both are scored by mean average precision over the classes that label at least one image (as
multi-label classification on VOC/COCO is reported). The CAM targets (cam, clip_cam, pseudo) take
the labels as input, so they classify nothing; their grids are still written.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax.clip import preprocess


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float | None:
  """AP of scores float [N] for binary targets [N]: the mean, over the positives, of the
  precision among the images scored at least as high as that positive (ties count against it).
  None when there is no positive."""
  scores, targets = np.asarray(scores, np.float64), np.asarray(targets) > 0
  pos = np.flatnonzero(targets)
  if not len(pos):
    return None
  # Images ranked at or above each positive (ties included), and the positives among them.
  above = (scores[None, :] >= scores[pos, None]).sum(1)
  hits = (scores[None, pos] >= scores[pos, None]).sum(1)
  return float(np.mean(hits / above))


def mean_average_precision(scores: np.ndarray, labels: np.ndarray, names) -> dict:
  """{"map": mean AP over classes with a positive (None if none), "per_class_ap": {name: AP or
  None}} of scores float [N, C-1] against multi-hot labels [N, C-1]."""
  aps = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
  defined = [a for a in aps if a is not None]
  return {
    "map": float(np.mean(defined)) if defined else None,
    "per_class_ap": dict(zip(names, aps)),
  }


def pixel_shares(pred: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 [C-1]: the share of pred int [H, W]'s pixels predicted as each foreground class."""
  counts = np.bincount(np.asarray(pred).ravel(), minlength=num_classes)[1:num_classes]
  return (counts / max(pred.size, 1)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zero_shot(clip, normalization, params, text_fg, image):
  x = preprocess.normalize(image[None], normalization)
  e = clip.apply({"params": params}, x, method=type(clip).encode_image)[0].astype(jnp.float32)
  return text_fg @ (e / jnp.linalg.norm(e))


def zero_shot_scores(task, frozen, image: np.ndarray) -> np.ndarray:
  """float32 [C-1] cosine of frozen CLIP's embedding of image uint8 [H, W, 3] (sides a multiple of
  the patch) with each class's text embedding."""
  out = _zero_shot(
    task.clip, task.options.normalization, frozen["clip"], frozen["text_fg"], jnp.asarray(image)
  )
  return np.asarray(out)


def format_lines(res: dict) -> str:
  """The image-level lines of an evaluation printout."""
  out = []
  for key, label in (("zero_shot", "zero-shot CLIP"), ("seg_classification", "seg classes")):
    if key in res:
      m = res[key]["map"]
      out.append(f"{label + ' mAP':<22}  {'-' if m is None else f'{100 * m:7.2f}'}")
  return "\n".join(out)
