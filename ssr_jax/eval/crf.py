"""Optional dense-CRF post-processing (method.md §1.8), on the host with pydensecrf2.

WeCLIP's `crf_proc`: the averaged multi-scale logits are resized bilinearly to the image size,
softmaxed, and refined by a fully connected CRF with a Gaussian (pos_xy_std=3, pos_w=3) and a
bilateral (bi_xy_std=64, bi_rgb_std=5, bi_w=4) kernel, 10 mean-field iterations; the label is the
argmax of the refined marginals. About 4 s for 512x512x21 on one CPU core (environment.md
pitfall 12), so it is off unless asked for. pydensecrf2 is imported only when a CRF is run.
"""

import numpy as np

from ssr_jax.eval.inference import resize_np

_INSTALL_HINT = (
  "dense CRF needs the optional package pydensecrf2 (it builds from source in ~40 s): "
  "pip install pydensecrf2==1.1  (listed in requirements-extras.txt)"
)


def import_densecrf():
  try:
    import pydensecrf.densecrf as dcrf  # Optional dependency, imported lazily.
    from pydensecrf.utils import unary_from_softmax
  except ImportError as e:
    raise ImportError(_INSTALL_HINT) from e
  return dcrf, unary_from_softmax


def dense_crf(
  image,
  probs,
  *,
  iter_max: int = 10,
  pos_xy_std: float = 3.0,
  pos_w: float = 3.0,
  bi_xy_std: float = 64.0,
  bi_rgb_std: float = 5.0,
  bi_w: float = 4.0,
) -> np.ndarray:
  """Refined marginals float32 [H, W, C] of softmax probabilities probs [H, W, C].

  image: uint8 RGB [H, W, 3] (the original, unnormalised pixels the bilateral kernel compares).
  The unary is -log(max(p, 1e-5)) (pydensecrf's `unary_from_softmax`).
  """
  dcrf, unary_from_softmax = import_densecrf()
  image = np.asarray(image)
  probs = np.asarray(probs, np.float32)
  h, w, c = probs.shape
  if image.shape != (h, w, 3) or image.dtype != np.uint8:
    raise ValueError(
      f"CRF image must be uint8 [H, W, 3] matching probs {probs.shape[:2]}, got "
      f"{image.dtype} {image.shape}"
    )
  unary = np.ascontiguousarray(unary_from_softmax(np.moveaxis(probs, -1, 0)))
  d = dcrf.DenseCRF2D(w, h, c)
  d.setUnaryEnergy(unary)
  d.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
  d.addPairwiseBilateral(
    sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=np.ascontiguousarray(image), compat=bi_w
  )
  q = np.asarray(d.inference(int(iter_max)), np.float32).reshape(c, h, w)
  return np.moveaxis(q, 0, -1)


def softmax_np(logits, axis: int = -1) -> np.ndarray:
  """Numerically stable softmax in float32 on the host."""
  z = np.asarray(logits, np.float32)
  z = np.exp(z - z.max(axis=axis, keepdims=True))
  return z / z.sum(axis=axis, keepdims=True)


def crf_predict(image, logits, **crf_kwargs) -> np.ndarray:
  """CRF prediction int32 [H, W] from averaged logits [h, w, C] on any grid (§1.8).

  The logits are resized bilinearly to the image size [H, W] and softmaxed first, as WeCLIP.
  crf_kwargs: the `dense_crf` keywords.
  """
  image = np.asarray(image)
  probs = softmax_np(resize_np(logits, image.shape[:2]))
  return np.argmax(dense_crf(image, probs, **crf_kwargs), axis=-1).astype(np.int32)
