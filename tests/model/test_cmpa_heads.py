"""CMPA as published (method §2): GradCAM through the ISA/TSA heads, the class features, the
prototype bank and L_proto, each against an explicit computation written from the spec."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.model import prototypes as pt
from ssr_jax.model.ssr import build_task
from tests.model.test_ssr import _config, _setup

EPS = 1e-5  # BatchNorm epsilon of the heads (PyTorch's default).


def _randomize_stats(variables, seed=0):
  """Running BatchNorm statistics far from their (0, 1) init, so that using them matters."""
  rng = np.random.default_rng(seed)
  bs = jax.tree.map(np.asarray, variables["batch_stats"])
  for head in bs.values():
    for layer in head.values():
      layer["mean"] = rng.normal(size=layer["mean"].shape).astype(np.float32) * 0.3
      layer["var"] = rng.uniform(0.5, 2.0, size=layer["var"].shape).astype(np.float32)
  return {**variables, "batch_stats": bs}


def _head_jnp(p, stats, x, *, batch_stats: bool):
  """Linear -> BN -> ReLU -> Linear -> L2, written out (running or batch statistics)."""
  h = x @ p["dense_0"]["kernel"]  # No bias before BatchNorm.
  if batch_stats:
    rows = h.reshape(-1, h.shape[-1])
    mean, var = rows.mean(0), rows.var(0)
  else:
    mean, var = stats["bn_0"]["mean"], stats["bn_0"]["var"]
  h = (h - mean) / jnp.sqrt(var + EPS) * p["bn_0"]["scale"] + p["bn_0"]["bias"]
  h = jnp.maximum(h, 0.0)
  out = h @ p["out"]["kernel"] + p["out"]["bias"]
  return out / jnp.linalg.norm(out, axis=-1, keepdims=True), (mean, var)


def _minmax(x):
  x = x - x.min()
  return x / (x.max() + 1e-7)


def test_heads_gradcam_matches_an_explicit_computation():
  """Per image and present class, one jax.grad of the heads-space softmax score through the
  last block (no vmap, no shared pullback), the GradCAM map and pytorch_grad_cam's scaling."""
  task, frozen, batch, variables = _setup(cmpa="clip", sgc=False)
  variables = _randomize_stats(variables)
  batch = dict(batch, labels=np.array([[1, 0, 1], [0, 1, 0]], np.float32))
  clip, cp = task.clip, {"params": frozen["clip"]}
  f = task.clip_features(frozen, batch["image"])
  grid = f["grid"]
  got, ids, valid, _, _ = jax.jit(
    lambda v, fr, hid, lab: task.gradcam(v, fr, hid, lab, grid, heads=True)
  )(variables, frozen, f["hidden"], batch["labels"])

  p, bs = variables["params"], variables["batch_stats"]
  texts = jnp.concatenate([frozen["text_fg"], frozen["text_bg"]])
  t, _ = _head_jnp(p["tsa"], bs["tsa"], texts, batch_stats=False)
  scale = float(np.exp(-np.asarray(p["log_temperature"])))
  x_prev = f["hidden"][-1]
  for b in range(2):
    xb = x_prev[b : b + 1]
    act = clip.apply(cp, xb, method=clip.last_block_pre_norm)
    present = np.flatnonzero(batch["labels"][b])
    keep = np.concatenate([batch["labels"][b] > 0, np.ones(2, bool)])
    for k, c in enumerate(present):

      def score(a, c=c, xb=xb, keep=keep):
        z, _ = clip.apply(cp, xb, ln1_out=a, method=clip.last_block)
        v = clip.apply(cp, z[:, 1:], method=clip.token_features)  # ln_post + proj per token
        v_img, _ = _head_jnp(p["isa"], bs["isa"], v, batch_stats=False)
        v_img = v_img.mean(axis=1)[0]  # cam_pooling "tokens": ISA on tokens, then the mean
        v_img = v_img / jnp.linalg.norm(v_img)
        logits = jnp.where(keep, scale * t @ v_img, -jnp.inf)
        return jax.nn.softmax(logits)[c]

      g = np.asarray(jax.grad(score)(act))[0, 1:]  # [N, W], patch tokens
      a = np.asarray(act)[0, 1:]
      cam_map = np.maximum(a @ g.mean(axis=0), 0.0)
      want = _minmax(_minmax(cam_map)).reshape(grid)
      assert ids[b, k] == c and valid[b, k]
      np.testing.assert_allclose(np.asarray(got[b, k]), want, rtol=1e-4, atol=1e-5)
  # The heads' CAMs are not frozen CLIP's.
  clip_cams = task.gradcam(variables, frozen, f["hidden"], batch["labels"], grid, heads=False)[0]
  assert np.abs(np.asarray(clip_cams) - np.asarray(got)).max() > 0.05


def _np_lloyd(x, init, iters):
  c = np.array(init, np.float64)
  for _ in range(iters):
    a = np.array([np.argmin(((c - xi) ** 2).sum(1)) for xi in x])
    for k in range(len(c)):
      if (a == k).any():
        c[k] = x[a == k].mean(0)
  return c


def test_bank_push_is_a_ring_of_the_valid_samples_and_refresh_is_kmeans():
  rng = np.random.default_rng(0)
  m, d, c = 7, 3, 4
  bank = pt.init_bank(m, d, c)
  ring_img, ring_lab = [], []
  for _ in range(3):  # 3 pushes of 2x2 samples, some invalid: wraps around the 7 slots.
    img = rng.normal(size=(2, 2, d)).astype(np.float32)
    lab = rng.integers(0, c, (2, 2))
    valid = rng.random((2, 2)) < 0.8
    bank = jax.jit(pt.bank_push)(bank, img, img + 1, lab, valid)
    ring_img += list(img.reshape(-1, d)[valid.reshape(-1)])
    ring_lab += list(lab.reshape(-1)[valid.reshape(-1)])
  n = len(ring_img)
  assert int(bank["ptr"]) == n
  want_img, want_lab = np.zeros((m, d), np.float32), np.full(m, -1)
  for i in range(n):  # Sample i lands in slot i mod M; later ones overwrite.
    want_img[i % m], want_lab[i % m] = ring_img[i], ring_lab[i]
  np.testing.assert_array_equal(np.asarray(bank["image"]), want_img)
  np.testing.assert_array_equal(
    np.asarray(bank["text"])[want_lab >= 0], want_img[want_lab >= 0] + 1
  )
  np.testing.assert_array_equal(np.asarray(bank["label"]), want_lab)

  prev = rng.normal(size=(c, d)).astype(np.float32)
  bank = dict(bank, image_protos=prev, text_protos=prev)
  out = jax.jit(lambda b: pt.bank_refresh(b, iters=5))(bank)
  filled = want_lab >= 0
  x, lab = want_img[filled].astype(np.float64), want_lab[filled]
  init = np.array([x[lab == k].mean(0) if (lab == k).any() else prev[k] for k in range(c)])
  np.testing.assert_allclose(np.asarray(out["image_protos"]), _np_lloyd(x, init, 5), atol=1e-5)
  init_t = np.array([(x + 1)[lab == k].mean(0) if (lab == k).any() else prev[k] for k in range(c)])
  np.testing.assert_allclose(np.asarray(out["text_protos"]), _np_lloyd(x + 1, init_t, 5), atol=1e-5)
  assert int(out["refreshes"]) == 1


def _pseudo_labels(task, variables, frozen, batch, *, heads):
  """The step's pseudo-labels (CAMs, tokens) with the attention affinity (zero decoder
  features: RFM off)."""
  f = task.clip_features(frozen, batch["image"])
  dec = jnp.zeros((batch["image"].shape[0], f["grid"][0] * f["grid"][1], 16))
  return task.pseudo_labels(variables, frozen, f, batch, dec, use_rfm=False, heads=heads)


@pytest.mark.parametrize("contrast", ["cross", "intra"])
def test_prototype_loss_step_matches_numpy(contrast):
  """L_proto of one step after a refresh (cluster positives, symmetric term), the updated
  running statistics and the pushed bank samples, against numpy from the CAMs and tokens.
  contrast "intra": each modality against its own prototypes (Table 4's row)."""
  task, frozen, batch, variables = _setup(cmpa="clip", sgc=False)
  cmpa = dataclasses.replace(task.options.cmpa, contrast=contrast)
  task = dataclasses.replace(task, options=dataclasses.replace(task.options, cmpa=cmpa))
  batch = dict(batch, labels=np.array([[1, 0, 1], [0, 1, 0]], np.float32))
  co = task.options.cmpa
  rng = np.random.default_rng(1)
  bank = pt.init_bank(co.bank_size, co.out_dim, 3)
  bank = dict(
    bank,
    image_protos=rng.normal(size=(3, co.out_dim)).astype(np.float32),
    text_protos=rng.normal(size=(3, co.out_dim)).astype(np.float32),
    refreshes=jnp.int32(1),
  )
  variables = {**_randomize_stats(variables), "bank": bank}
  step = 3  # Heads' CAMs (from step 2), no refresh at this step (refresh_every 2).
  pl = _pseudo_labels(task, variables, frozen, batch, heads=True)
  loss, metrics, coll = jax.jit(task._prototype_terms, static_argnums=3)(
    variables, frozen, pl, step
  )

  p = jax.tree.map(np.asarray, variables["params"])
  v = np.asarray(task.dense_features(frozen, pl["tokens"]))  # [B, N, D]
  v_img, (mean_i, var_i) = _head_jnp(p["isa"], None, jnp.asarray(v), batch_stats=True)
  texts = np.concatenate([frozen["text_fg"], frozen["text_bg"]])
  t, (mean_t, var_t) = _head_jnp(p["tsa"], None, jnp.asarray(texts), batch_stats=True)
  v_img, t_fg = np.asarray(v_img, np.float64), np.asarray(t, np.float64)[:3]
  cams = np.asarray(pl["cams"]).reshape(2, 2, -1)
  ids, valid = np.asarray(pl["ids"]), np.asarray(pl["valid"])
  tau = np.exp(float(p["log_temperature"]))
  p_i, p_t = np.asarray(bank["image_protos"], np.float64), np.asarray(bank["text_protos"])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731

  def ce(x, protos, target):
    logits = unit(protos) @ unit(x) / tau
    return np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[target]

  img_terms, txt_terms, pushed = [], [], []
  for b in range(2):
    for k in range(2):
      if not valid[b, k]:
        continue
      w = cams[b, k]
      f_img = (w[:, None] * v_img[b]).sum(0) / (w.sum() + 1e-5)
      cluster = np.argmin(((p_i - f_img) ** 2).sum(1))
      against_img, against_txt = (p_t, p_i) if contrast == "cross" else (p_i, p_t)
      img_terms.append(ce(f_img, against_img, cluster))
      f_txt = t_fg[ids[b, k]]
      txt_terms.append(ce(f_txt, against_txt, np.argmin(((p_t - f_txt) ** 2).sum(1))))
      pushed.append((f_img, f_txt, ids[b, k]))
  want = np.mean(img_terms) + co.symmetric_weight * np.mean(txt_terms)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["tau"]), tau, rtol=1e-6)

  # Running statistics move by the momentum towards the batch statistics (biased variance).
  old = variables["batch_stats"]
  m = co.bn_momentum
  np.testing.assert_allclose(
    coll["batch_stats"]["isa"]["bn_0"]["mean"],
    m * old["isa"]["bn_0"]["mean"] + (1 - m) * np.asarray(mean_i),
    rtol=1e-4,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    coll["batch_stats"]["tsa"]["bn_0"]["var"],
    m * old["tsa"]["bn_0"]["var"] + (1 - m) * np.asarray(var_t),
    rtol=1e-4,
    atol=1e-5,
  )
  new_bank = coll["bank"]
  assert int(new_bank["ptr"]) == len(pushed) == 3
  for i, (f_img, f_txt, c) in enumerate(pushed):
    np.testing.assert_allclose(new_bank["image"][i], f_img, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_bank["text"][i], f_txt, rtol=1e-4, atol=1e-6)
    assert int(new_bank["label"][i]) == c
  np.testing.assert_array_equal(new_bank["image_protos"], bank["image_protos"])  # No refresh.


def test_before_the_first_refresh_prototypes_are_the_text_features_and_positives_classes():
  task, frozen, batch, variables = _setup(cmpa="clip", sgc=False)
  pl = _pseudo_labels(task, variables, frozen, batch, heads=False)
  loss, _, coll = task._prototype_terms(variables, frozen, pl, 1)
  p = variables["params"]
  texts = jnp.concatenate([frozen["text_fg"], frozen["text_bg"]])
  t, _ = _head_jnp(p["tsa"], None, texts, batch_stats=True)
  for key in ("text_protos", "image_protos"):
    np.testing.assert_allclose(coll["bank"][key], t[:3], rtol=1e-5, atol=1e-6)
  assert int(coll["bank"]["refreshes"]) == 0
  # No clusters yet: a class-label positive gives the same loss.
  c = _config(cmpa="clip", sgc=False)
  c.model.cmpa.positive = "class"
  by_class = build_task(c.model, c.loss, clip=task.clip, num_classes=4)
  loss_class, _, _ = by_class._prototype_terms(variables, frozen, pl, 1)
  np.testing.assert_allclose(float(loss), float(loss_class), rtol=1e-6)
  # After a refresh the cluster positives differ from the class ones for these prototypes.
  bank = dict(variables["bank"], refreshes=jnp.int32(1), image_protos=-t[:3], text_protos=t[:3])
  v2 = {**variables, "bank": bank}
  assert float(task._prototype_terms(v2, frozen, pl, 1)[0]) != float(
    by_class._prototype_terms(v2, frozen, pl, 1)[0]
  )
