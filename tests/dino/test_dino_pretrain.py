"""The tiny DINO's pretraining (ssr_jax.dino.pretrain): DINO's CLS and patch losses and the
pixel loss against numpy, the teacher as an EMA of the student, the denoising step's wiring,
multi-crop and its patch matching, short runs, resumption, and the attention-purity measure."""

import dataclasses

import jax
import numpy as np
import pytest

from ssr_jax.dino import pretrain
from ssr_jax.dino.model import DINOConfig, normalize

CFG = DINOConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp=32)
SMALL = dict(global_size=16, local_size=8, out_dim=32, head_hidden=16, head_bottleneck=8)
# DINO + iBOT + the cross-view term (the shipped recipe is DENOISE's).
RECIPE = dataclasses.replace(
  pretrain.RECIPE,
  **SMALL,
  num_local=2,
  cls_weight=1.0,
  dense_weight=1.0,
  ibot_weight=1.0,
  mask_prob=1.0,
  pixel_weight=0.0,
  noise_std=0.0,
)
DENOISE = dataclasses.replace(pretrain.RECIPE, **SMALL)


_TEMPS = dict(student_temp=0.1, teacher_temp=0.04)


def _images(n=8, size=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def test_dino_loss_matches_numpy():
  rng = np.random.default_rng(0)
  v, g, b, k = 4, 2, 3, 5
  student = rng.normal(size=(v, b, k)).astype(np.float32)
  teacher = rng.normal(size=(g, b, k)).astype(np.float32)
  center = rng.normal(size=k).astype(np.float32) * 0.1
  got = pretrain.dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
  # DINOLoss.forward, loop for loop: centred, sharpened teacher targets; every student view but
  # the teacher's own.
  targets = _softmax((teacher - center) / 0.04)
  total, pairs = 0.0, 0
  for iq in range(g):
    for iv in range(v):
      if iv == iq:
        continue
      logp = np.log(_softmax(student[iv] / 0.1))
      total += np.sum(-targets[iq] * logp, axis=-1).mean()
      pairs += 1
  np.testing.assert_allclose(float(got), total / pairs, rtol=1e-5)
  new = pretrain.update_center(center, teacher, 0.9)
  np.testing.assert_allclose(new, 0.9 * center + 0.1 * teacher.mean(axis=(0, 1)), rtol=1e-6)


def test_schedules():
  assert pretrain.teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
  assert pretrain.teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
  assert pretrain.teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)
  warm = dataclasses.replace(RECIPE, warmup_teacher_temp=0.02, warmup_teacher_temp_frac=0.5)
  assert pretrain.teacher_temperature(0, 100, warm) == pytest.approx(0.02)
  assert pretrain.teacher_temperature(25, 100, warm) == pytest.approx(0.03)
  assert pretrain.teacher_temperature(60, 100, warm) == pytest.approx(0.04)
  assert pretrain.teacher_temperature(0, 100, RECIPE) == pytest.approx(0.04)


def test_dense_loss_matches_numpy():
  rng = np.random.default_rng(1)
  b, n, k = 2, 4, 5
  student = rng.normal(size=(2, b, n, k)).astype(np.float32)
  teacher = rng.normal(size=(2, b, n, k)).astype(np.float32)
  center = rng.normal(size=k).astype(np.float32) * 0.1
  index = rng.integers(0, n, (2, b, n)).astype(np.int32)
  valid = (rng.random((2, b, n)) < 0.7).astype(np.float32)
  got = pretrain.dense_loss(
    student, teacher, center, index, valid, student_temp=0.1, teacher_temp=0.04
  )
  targets = _softmax((teacher - center) / 0.04)
  total, count = 0.0, 0
  for a in range(2):
    for i in range(b):
      for p in range(n):
        if valid[a, i, p]:
          q = targets[1 - a, i, index[a, i, p]]  # The other view's matched patch.
          total += -np.sum(q * np.log(_softmax(student[a, i, p] / 0.1)))
          count += 1
  np.testing.assert_allclose(float(got), total / count, rtol=1e-5)


def test_masked_patch_loss_matches_numpy():
  rng = np.random.default_rng(2)
  b, n, k = 2, 4, 5
  student = rng.normal(size=(2, b, n, k)).astype(np.float32)
  teacher = rng.normal(size=(2, b, n, k)).astype(np.float32)
  center = rng.normal(size=k).astype(np.float32) * 0.1
  mask = rng.random((2, b, n)) < 0.5
  got = pretrain.masked_patch_loss(student, teacher, center, mask, **_TEMPS)
  targets = _softmax((teacher - center) / 0.04)
  ce = [
    -np.sum(targets[v, i, p] * np.log(_softmax(student[v, i, p] / 0.1)))
    for v in range(2)
    for i in range(b)
    for p in range(n)
    if mask[v, i, p]  # The same view's same patch, unmasked for the teacher.
  ]
  np.testing.assert_allclose(float(got), np.mean(ce), rtol=1e-5)
  none = np.zeros_like(mask)
  assert float(pretrain.masked_patch_loss(student, teacher, center, none, **_TEMPS)) == 0.0


def test_patch_masks():
  recipe = dataclasses.replace(RECIPE, mask_prob=0.5, mask_ratio=(0.2, 0.4))
  mask = pretrain.patch_masks(np.random.default_rng(0), (2, 500, 64), recipe)
  assert mask.shape == (2, 500, 64) and mask.dtype == bool
  counts = mask.sum(-1)
  on = counts > 0
  assert 0.4 < on.mean() < 0.6  # mask_prob of the views.
  assert counts[on].min() >= round(0.2 * 64) and counts[on].max() <= round(0.4 * 64)
  # Positions differ between views (a fresh permutation each).
  assert len({tuple(m) for m in mask.reshape(-1, 64)[on.ravel()]}) == on.sum()


def test_match_patches():
  same = np.array([[[0, 0, 64, 64]], [[0, 0, 64, 64]]])
  index, valid = pretrain.match_patches(same, np.zeros((2, 1), bool), 8)
  np.testing.assert_array_equal(index, np.broadcast_to(np.arange(64), (2, 1, 64)))
  assert valid.all()
  # View 1 mirrored: column j of either view shows the other's column 7 - j.
  index, _ = pretrain.match_patches(same, np.array([[False], [True]]), 8)
  np.testing.assert_array_equal(index[:, 0, :8], [[7, 6, 5, 4, 3, 2, 1, 0]] * 2)
  # View 1 shifted right by half a view: only the overlapping half matches.
  shifted = np.array([[[0, 0, 64, 64]], [[32, 0, 64, 64]]])
  index, valid = pretrain.match_patches(shifted, np.zeros((2, 1), bool), 8)
  np.testing.assert_array_equal(valid[0, 0, :8], [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(index[0, 0, 4:8], [0, 1, 2, 3])
  np.testing.assert_array_equal(valid[1, 0, :8], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(index[1, 0, :4], [4, 5, 6, 7])


def test_multicrop_shapes_range_and_determinism():
  images = _images(3, size=24)
  crops = pretrain.multicrop(images, np.random.default_rng(5), patch=8, recipe=RECIPE)
  g, lo = crops["globals"], crops["locals"]
  assert g.shape == (2, 3, 16, 16, 3) and lo.shape == (2, 3, 8, 8, 3)
  assert crops["index"].shape == crops["valid"].shape == crops["mask"].shape == (2, 3, 4)
  assert g.dtype == lo.dtype == np.float32
  assert 0.0 <= g.min() and g.max() <= 1.0
  again = pretrain.multicrop(images, np.random.default_rng(5), patch=8, recipe=RECIPE)
  for k in crops:
    np.testing.assert_array_equal(crops[k], again[k])
  assert not np.array_equal(g[0], g[1])  # Two independently augmented global views.
  assert pretrain.crop_sizes(96, 8) == (64, 32)
  assert pretrain.crop_sizes(20, 8, RECIPE) == (16, 8)


def test_step_updates_student_and_teacher_is_its_ema():
  model = pretrain.Distiller(CFG, RECIPE)
  tx = pretrain.make_optimizer(lr=1e-3, steps=10, recipe=RECIPE)
  state = pretrain.init_state(model, tx, jax.random.PRNGKey(0), 16)
  step = pretrain.make_step(model, tx)
  crops = pretrain.multicrop(_images(), np.random.default_rng(0), patch=8, recipe=RECIPE)
  # A frozen last layer first (this step's warm-up learning rate is 0 anyway)...
  frozen = pretrain.schedule(0, 10, RECIPE) | {"freeze": np.float32(1.0)}
  state, _ = step(state, crops, frozen)
  last = np.asarray(state["student"]["head"]["last_layer"])
  state, _ = step(state, crops, frozen)
  np.testing.assert_array_equal(state["student"]["head"]["last_layer"], last)
  # ...then a step where every parameter moves.
  sched = pretrain.schedule(5, 10, RECIPE)
  before = jax.device_get(state)  # The step donates its state.
  state, metrics = step(state, crops, sched)
  after = jax.device_get(state)
  assert np.isfinite(float(metrics["loss"]))
  m = float(sched["momentum"])
  flat = lambda t: jax.tree_util.tree_leaves_with_path(t)
  for (path, s_old), (_, s_new), (_, t_old), (_, t_new) in zip(
    flat(before["student"]),
    flat(after["student"]),
    flat(before["teacher"]),
    flat(after["teacher"]),
  ):
    assert not np.array_equal(s_old, s_new), path
    # The teacher follows the student after its update (DINO's order).
    np.testing.assert_allclose(t_new, m * t_old + (1 - m) * s_new, rtol=1e-5, atol=1e-7)
  assert not np.allclose(after["center"], 0.0)
  assert not np.allclose(after["center_patch"], 0.0)
  assert np.isfinite(float(metrics["dense"])) and float(metrics["dense"]) > 0
  assert np.isfinite(float(metrics["ibot"])) and float(metrics["ibot"]) > 0
  total = metrics["cls"] + metrics["dense"] + metrics["ibot"]  # Both weights are 1 here.
  np.testing.assert_allclose(float(metrics["loss"]), float(total), rtol=1e-6)


def _stream(step):
  """A pure function of the step, as the demo's generator stream."""
  return _images(4, seed=step)


def test_patchify_and_pixel_loss_match_numpy():
  rng = np.random.default_rng(3)
  images = rng.normal(size=(2, 16, 24, 3)).astype(np.float32)
  got = np.asarray(pretrain.patchify(images, 8))
  assert got.shape == (2, 6, 192)
  for i in range(2):
    for r in range(2):
      for c in range(3):
        want = images[i, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8].ravel()  # Row-major patch.
        np.testing.assert_array_equal(got[i, 3 * r + c], want)
  pred = rng.normal(size=got.shape).astype(np.float32)
  mask = rng.random((2, 6)) < 0.5
  want = np.mean(
    [np.abs(pred[i, n] - got[i, n]).mean() for i in range(2) for n in range(6) if mask[i, n]]
  )
  np.testing.assert_allclose(float(pretrain.masked_pixel_loss(pred, got, mask)), want, rtol=1e-6)
  assert float(pretrain.masked_pixel_loss(pred, got, np.zeros_like(mask))) == 0.0


def test_denoising_step_scores_every_patch_of_the_noisy_views_and_skips_the_teacher():
  model = pretrain.Distiller(CFG, DENOISE)
  tx = pretrain.make_optimizer(lr=1e-3, steps=10, recipe=DENOISE)
  state = pretrain.init_state(model, tx, jax.random.PRNGKey(0), 16)
  crops = pretrain.multicrop(_images(), np.random.default_rng(0), patch=8, recipe=DENOISE)
  g, noise = crops["globals"], crops["noise"]
  assert noise.shape == g.shape and 0.9 < noise.std() < 1.1  # noise_std 1.
  assert not crops["mask"].any() and crops["locals"].shape[0] == 0
  # The oracle: the student's pixel head on the noisy views, L1 to the clean pixels of every
  # patch, in numpy.
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  noisy = np.asarray(normalize(flat(g))) + flat(noise)
  out = model.apply({"params": state["student"]}, noisy, patches=True)
  clean = np.asarray(normalize(flat(g)))
  target = clean.reshape(16, 2, 8, 2, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(16, 4, 192)
  want = np.abs(np.asarray(out["pixels"]) - target).mean()
  step = pretrain.make_step(model, tx)
  sched = pretrain.schedule(5, 10, DENOISE)
  state, metrics = step(state, crops, sched)  # The warm-up's first learning rate is 0.
  np.testing.assert_allclose(float(metrics["pixel"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  assert float(metrics["cls"]) == float(metrics["ibot"]) == float(metrics["dense"]) == 0.0
  before = jax.device_get(state)
  state, _ = step(state, crops, sched)
  after = jax.device_get(state)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["student"], after["student"])
  assert jax.tree.leaves(moved["backbone"]) and all(jax.tree.leaves(moved["backbone"]))
  assert moved["pixel_head"]["kernel"]
  jax.tree.map(np.testing.assert_array_equal, before["teacher"], after["teacher"])  # Unused.


def test_pretrain_runs_and_moves_the_teacher():
  recipe = dataclasses.replace(RECIPE, dense_weight=0.0, ibot_weight=0.0)  # DINO v1.
  assert pretrain.distills_from_teacher(recipe) and not pretrain.distills_from_teacher(DENOISE)
  params, info = pretrain.pretrain_dino(CFG, _stream, steps=3, lr=1e-3, seed=0, recipe=recipe)
  assert np.isfinite(info["final_loss"]) and info["steps_run"] == 3
  init = pretrain.Distiller(CFG, RECIPE).init(jax.random.PRNGKey(0), _images(1) / 255.0)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), params, init["params"]["backbone"])
  assert all(jax.tree.leaves(moved))


class _Killed(Exception):
  pass


def test_pretrain_resumes_exactly(tmp_path):
  """A run of the shipped (denoising) recipe killed after its step-2 checkpoint and rerun
  continues to the same weights, bit for bit, as one uninterrupted run; other settings are
  refused before any step."""
  run = dict(steps=4, lr=1e-3, seed=0, recipe=DENOISE, settings=dict(steps=4), save_every=2)
  straight, _ = pretrain.pretrain_dino(CFG, _stream, workdir=tmp_path / "a", **run)

  def dies_at_3(step):
    if step == 3:
      raise _Killed
    return _stream(step)

  with pytest.raises(_Killed):
    pretrain.pretrain_dino(CFG, dies_at_3, workdir=tmp_path / "b", **run)
  assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["2"]
  seen = []
  resumed, info = pretrain.pretrain_dino(
    CFG, lambda i: seen.append(i) or _stream(i), workdir=tmp_path / "b", **run
  )
  assert seen == [2, 3] and info["steps_run"] == 2
  for (path, a), (_, b) in zip(
    jax.tree_util.tree_leaves_with_path(straight), jax.tree_util.tree_leaves_with_path(resumed)
  ):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
  # Finished: a rerun restores the final state and makes no step.
  again, info = pretrain.pretrain_dino(CFG, _stream, workdir=tmp_path / "b", **run)
  assert info["steps_run"] == 0
  jax.tree.map(np.testing.assert_array_equal, again, resumed)
  with pytest.raises(ValueError, match="other steps"):
    other = run | dict(settings=dict(steps=5))
    pretrain.pretrain_dino(CFG, _stream, workdir=tmp_path / "b", **other)


def test_attention_purity():
  masks = np.zeros((1, 16, 16), np.uint8)
  masks[:, :, 8:] = 3  # Left column of patches background, right column class 3.
  masks[:, :3, :] = 3  # A minority strip: the top-left patch stays mostly background.
  seg = pretrain.patch_segments(masks, 8)
  np.testing.assert_array_equal(seg, [[0, 3, 0, 3]])
  t = 5
  eye = np.eye(t)[None]  # Each patch attends to itself only.
  assert pretrain.attention_purity(eye, seg) == pytest.approx(1.0)
  uniform = np.full((1, t, t), 1.0 / t)  # The CLS column is dropped and rows renormalised.
  assert pretrain.attention_purity(uniform, seg) == pytest.approx(0.5)
  assert pretrain.uniform_purity(seg) == pytest.approx(0.5)
  # Balanced: each segment's mean first. Three background patches and one object patch.
  seg = np.array([[0, 0, 0, 3]])
  assert pretrain.uniform_purity(seg) == pytest.approx((3 * 0.75 + 0.25) / 4)
  assert pretrain.uniform_purity(seg, balanced=True) == pytest.approx((0.75 + 0.25) / 2)
  assert pretrain.attention_purity(eye, seg, balanced=True) == pytest.approx(1.0)
