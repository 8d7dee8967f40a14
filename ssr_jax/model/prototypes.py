"""CMPA's class features, K-means prototypes and prototype contrastive loss (method §2.3-2.5).

Pure functions on arrays, jittable with static shapes (padding is carried by validity masks).
Letters: B batch, N = h*w patch tokens, d feature width (d2 of the heads), K padded classes per
image (or prototypes), M bank samples.
"""

import math

import jax
import jax.numpy as jnp


def cam_weighted_pool(feats, cams, valid=None, *, eps=1e-5):
  """Class features f_image by CAM-weighted masked average pooling (Eq. 2).

  f[b, k] = sum_n cam[b, k, n] v'[b, n] / (sum_n cam[b, k, n] + eps): soft weights from the
  GradCAM map of class k, not the hard pseudo-labels (§2.3).

  Args:
    feats: [B, N, d] projected dense features v' (ISA output on every patch token).
    cams: [B, K, N] (or [B, K, h, w]) non-negative CAMs of the padded present classes.
    valid: optional [B, K] bool; invalid entries come out as zeros.
    eps: keeps an all-zero map finite (its feature is then ~0).

  Returns:
    [B, K, d] float32.
  """
  cams = cams.reshape(*cams.shape[:2], -1).astype(jnp.float32)
  feats = feats.astype(jnp.float32)
  num = jnp.einsum("bkn,bnd->bkd", cams, feats)
  out = num / (cams.sum(axis=-1, keepdims=True) + eps)
  if valid is not None:
    out = jnp.where(valid[..., None], out, 0.0)
  return out


def class_means(x, labels, mask=None, *, num_classes: int, fallback):
  """Per-class mean of samples: the K-means initialisation that keeps cluster k = class k.

  Args:
    x: [M, d]; labels: [M] int class ids in [0, num_classes); mask: optional [M] bool.
    fallback: [num_classes, d] used for a class without samples (e.g. the previous prototypes,
      or TSA(t) before the first refresh).

  Returns:
    [num_classes, d] float32.
  """
  w = jnp.ones(x.shape[0], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * w[:, None]
  counts = onehot.sum(axis=0)[:, None]
  means = onehot.T @ x.astype(jnp.float32) / jnp.maximum(counts, 1.0)
  return jnp.where(counts > 0, means, jnp.asarray(fallback, jnp.float32))


def l2_normalize(x, axis: int = -1):
  """x / ||x|| along axis; zero rows stay zero, with finite gradients there."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-24))


def _sq_distances(x, c):
  """[M, K] squared Euclidean distances, expanded (no [M, K, d] intermediate)."""
  d2 = (x * x).sum(-1)[:, None] - 2.0 * x @ c.T + (c * c).sum(-1)[None, :]
  return jnp.maximum(d2, 0.0)


def kmeans(x, init, mask=None, *, iters: int):
  """Lloyd's K-means with a fixed number of iterations, on device (§2.4).

  Each iteration assigns every valid sample to its nearest centroid (squared Euclidean; ties go
  to the lowest index), then moves each centroid to the mean of its samples. A cluster that gets
  no sample keeps its previous centroid. Initialised at `init` (the class means), so cluster k
  stays attached to class k. The returned assignments are to the returned centroids.

  Args:
    x: [M, d] samples (the bank's per-(image, class) features).
    init: [K, d] initial centroids.
    mask: optional [M] bool; False rows (empty bank slots) neither move centroids nor get a label.
    iters: number of Lloyd updates (static); 0 returns `init` and its assignments.

  Returns:
    (centroids [K, d] float32, assign [M] int32, -1 for masked rows).
  """
  x = x.astype(jnp.float32)
  k = init.shape[0]
  w = jnp.ones(x.shape[0], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)

  def assign(c):
    return jnp.argmin(_sq_distances(x, c), axis=-1)

  def update(_, c):
    onehot = jax.nn.one_hot(assign(c), k, dtype=jnp.float32) * w[:, None]  # [M, K]
    counts = onehot.sum(axis=0)
    sums = onehot.T @ x
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

  c = jax.lax.fori_loop(0, iters, update, init.astype(jnp.float32))
  a = assign(c).astype(jnp.int32)
  return c, jnp.where(w > 0, a, -1)


def init_log_temperature(tau: float = 0.05):
  """The learnable log-temperature's initial value: log(0.05), the paper's tau (§2.5)."""
  return jnp.asarray(math.log(tau), jnp.float32)


def prototype_ce(feats, prototypes, targets, valid=None, *, log_temperature, normalize=True):
  """Prototype contrastive loss of Eq. 6 (§2.5).

  p_i = v'_i . P / tau with tau = exp(log_temperature); the target prototype is the positive,
  the other K - 1 are negatives: cross-entropy over the K prototypes, averaged over the valid
  samples (0 if there are none). Background is not a prototype.

  Args:
    feats: [..., d] samples (e.g. [B, K, d] f_image).
    prototypes: [K, d] (P_T for image samples).
    targets: [...] int, the cluster pseudo-label (or class id) of each sample, in [0, K).
    valid: optional [...] bool.
    log_temperature: scalar (learnable).
    normalize: L2-normalise samples and prototypes first ([inferred]: tau = 0.05 presumes cosine
      logits; K-means centroids of unit vectors are shorter than 1 and would soften them).

  Returns:
    scalar float32 loss.
  """
  feats = feats.astype(jnp.float32)
  prototypes = prototypes.astype(jnp.float32)
  if normalize:
    # Zero rows (padding, an all-zero CAM) must keep finite gradients: no norm's sqrt at 0.
    feats, prototypes = l2_normalize(feats), l2_normalize(prototypes)
  logits = feats @ prototypes.T * jnp.exp(-log_temperature)  # [..., K]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None].astype(jnp.int32), -1)[..., 0]
  w = jnp.ones(nll.shape, jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
  return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)


def cmpa_prototype_loss(
  f_image,
  image_targets,
  image_valid,
  text_prototypes,
  *,
  log_temperature,
  f_text=None,
  text_targets=None,
  text_valid=None,
  image_prototypes=None,
  symmetric_weight: float = 0.0,
  normalize: bool = True,
):
  """L_proto: image class features against the text prototypes P_T (Eq. 6), plus optionally
  the symmetric term, text class features against the image prototypes P_I ([inferred], for
  the paper's "different classes' cross-modal prototypes separate"):
  L = CE(f_image, P_T) + symmetric_weight * CE(f_text, P_I).

  Args:
    f_image: [..., d]; image_targets, image_valid: [...] (see `prototype_ce`).
    text_prototypes: [K, d] P_T.
    f_text, text_targets, text_valid, image_prototypes: the symmetric term's inputs (t'[c] per
      sample, their labels, P_I [K, d]); needed only when symmetric_weight != 0.

  Returns:
    scalar float32.
  """
  loss = prototype_ce(
    f_image,
    text_prototypes,
    image_targets,
    image_valid,
    log_temperature=log_temperature,
    normalize=normalize,
  )
  if symmetric_weight:
    loss = loss + symmetric_weight * prototype_ce(
      f_text,
      image_prototypes,
      text_targets,
      text_valid,
      log_temperature=log_temperature,
      normalize=normalize,
    )
  return loss


# ---------------------------------------------------------------- the prototype bank (§2.4)
# A ring of the latest M (image, class) samples, plus the prototypes of the last refresh. A
# pytree of fixed shapes, so it lives in the train state (checkpointed, replicated) and pushing,
# refreshing and reading it never recompile the step.


def init_bank(size: int, dim: int, num_classes: int):
  """An empty bank: M = size sample slots of width d = dim, C = num_classes prototypes.

  Returns dict(image [M, d], text [M, d], label [M] int32 (-1 = empty), ptr int32 (samples
  written so far), image_protos [C, d], text_protos [C, d], refreshes int32 (refreshes done)).
  """
  return dict(
    image=jnp.zeros((size, dim), jnp.float32),
    text=jnp.zeros((size, dim), jnp.float32),
    label=jnp.full((size,), -1, jnp.int32),
    ptr=jnp.zeros((), jnp.int32),
    image_protos=jnp.zeros((num_classes, dim), jnp.float32),
    text_protos=jnp.zeros((num_classes, dim), jnp.float32),
    refreshes=jnp.zeros((), jnp.int32),
  )


def bank_push(bank, image, text, label, valid):
  """Writes the valid samples of a batch into the ring, oldest slots first.

  image, text: [..., d] f_image / f_text; label: [...] int class ids; valid: [...] bool. The
  valid samples keep their row-major order; invalid ones are not written and take no slot.
  Returns the updated bank.
  """
  m, d = bank["image"].shape
  valid = jnp.asarray(valid, bool).reshape(-1)
  rank = jnp.cumsum(valid) - 1
  slot = jnp.where(valid, (bank["ptr"] + rank) % m, m)  # m: out of range, dropped.
  put = lambda arr, x: arr.at[slot].set(x, mode="drop")  # noqa: E731
  return dict(
    bank,
    image=put(bank["image"], jnp.asarray(image, jnp.float32).reshape(-1, d)),
    text=put(bank["text"], jnp.asarray(text, jnp.float32).reshape(-1, d)),
    label=put(bank["label"], jnp.asarray(label, jnp.int32).reshape(-1)),
    ptr=bank["ptr"] + valid.sum().astype(jnp.int32),
  )


def bank_refresh(bank, *, iters: int):
  """K-means of each modality's samples (K = C), initialised at the class means, so that
  cluster k stays class k; a class without samples starts from its previous prototype.

  Returns the bank with new image_protos / text_protos and refreshes + 1 (samples kept).
  """
  mask = bank["label"] >= 0
  label = jnp.maximum(bank["label"], 0)
  c = bank["image_protos"].shape[0]
  out = dict(bank, refreshes=bank["refreshes"] + 1)
  for key in ("image", "text"):
    init = class_means(bank[key], label, mask, num_classes=c, fallback=bank[key + "_protos"])
    out[key + "_protos"], _ = kmeans(bank[key], init, mask, iters=iters)
  return out


def nearest_prototype(x, prototypes):
  """Cluster pseudo-labels: index of the nearest prototype (squared Euclidean, as K-means
  assigns; ties to the lowest index). x: [..., d]; prototypes: [K, d]. Returns [...] int32."""
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  a = jnp.argmin(_sq_distances(flat, prototypes.astype(jnp.float32)), axis=-1)
  return a.reshape(x.shape[:-1]).astype(jnp.int32)
