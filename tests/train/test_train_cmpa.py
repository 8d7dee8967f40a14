"""SSR as published (CMPA, DINO attention, colour-region SGC) in the real train loop, on a tiny
random CLIP and DINO. CMPA's stateful parts: the prototype bank and
the heads' BatchNorm statistics are in the checkpoint (resume across a refresh is bitwise
exact), a refresh never recompiles the step, and 1 and 8 devices agree."""

import json
import logging
import types

import jax
import numpy as np
import pytest

from ssr_jax import experiment
from ssr_jax.clip.model import CLIP
from ssr_jax.testing import TINY_CLIP, fake_batch, random_build
from ssr_jax.train.loop import train
from ssr_jax.train.sharding import make_mesh
from tests.model.test_ssr import _config

BATCH, CROP, STEPS = 8, 32, 6


def _train_config():
  c = _config(cmpa="clip", sgc=True, dino=True, grouping="clusters")  # The paper's SSR.
  c.seed = 0
  c.model.cmpa.refresh_every = 2  # Refreshes at steps 2 and 4; heads' CAMs from step 2.
  c.model.cmpa.bank_size = 24  # Smaller than the samples of the run: the ring wraps.
  c.train.update(
    dict(
      batch_size=BATCH,
      num_steps=STEPS,
      log_every=1,
      checkpoint_every=3,  # The resumed run restarts between two refreshes.
      warmup_steps=2,
    )
  )
  c.train.heads.learning_rate = 1e-3
  return c


def _iterator(start, crash_at=None):
  step = start
  while True:
    if step == crash_at:
      raise RuntimeError(f"simulated crash at step {step}")
    yield fake_batch(BATCH, CROP, 3, seed=step)
    step += 1


def _run(config, workdir, mesh=None, crash_at=None):
  task, frozen = random_build(config)
  state = train(
    config,
    workdir,
    task=task,
    frozen=frozen,
    make_iterator=lambda start: _iterator(start, crash_at),
    mesh=mesh,
  )
  return jax.tree.map(np.asarray, jax.device_get(state))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  return types.SimpleNamespace(state=_run(_train_config(), workdir), workdir=workdir)


def test_the_bank_fills_wraps_and_refreshes(straight):
  bank = straight.state.model_state["bank"]
  assert int(bank["refreshes"]) == 2
  assert int(bank["ptr"]) > bank["label"].shape[0]  # Wrapped around.
  assert (bank["label"] >= 0).all()
  # The refreshed prototypes are K-means centroids of the bank, not TSA's text features.
  assert not np.allclose(bank["image_protos"], bank["text_protos"])


def test_resume_across_a_refresh_is_bitwise_exact_and_compiles_once(straight, tmp_path, caplog):
  config = _train_config()
  # A crash after the checkpoint of step 3, between the refreshes at 2 and 4.
  with pytest.raises(RuntimeError, match="simulated crash at step 4"):
    _run(config, tmp_path, crash_at=4)
  with caplog.at_level(logging.INFO):
    resumed = _run(config, tmp_path)  # Crosses the refresh at step 4.
  assert "Train step compiled 1 time(s)." in caplog.text
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(straight.state)[0], jax.tree.leaves(resumed)
  ):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _logged(workdir):
  with open(workdir / "train_metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_one_and_eight_devices_agree(straight, tmp_path_factory):
  """Same losses at every step (float32 reduction-order noise, ~1e-6) and final variables,
  across the heads' CAM start and both refreshes. (With a bias before the heads' BatchNorm this
  failed: its gradient is rounding noise, which Adam turns into full-size steps. The decoder's
  attention key bias is such a parameter too, as in WeCLIP's torch MHA: hence atol 2e-4, a tenth
  of one decoder step.)"""
  assert jax.device_count() == 8
  one_dir = tmp_path_factory.mktemp("one")
  one = _run(_train_config(), one_dir, mesh=make_mesh(jax.devices()[:1]))
  eight, one_log = _logged(straight.workdir), _logged(one_dir)
  assert [r["step"] for r in eight] == [r["step"] for r in one_log] == list(range(1, STEPS + 1))
  for a, b in zip(eight, one_log):
    for key in ("loss", "proto", "seg", "aff"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=f"{key} at {a['step']}")
    assert a["cluster_agree"] == b["cluster_agree"]
  for tree in ("params", "model_state"):
    for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(getattr(straight.state, tree))[0],
      jax.tree.leaves(getattr(one, tree)),
    ):
      np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=2e-4, err_msg=tree + jax.tree_util.keystr(path)
      )


def test_derived_tau_is_what_the_guard_checks():
  """CMPA's tau = exp(log_temperature), declared to the NaN guard: inf once log_temperature
  passes log(float32 max) ~ 88.72, while the parameter itself is still finite."""
  task = experiment.make_task(_config(cmpa="clip"), clip=CLIP(TINY_CLIP))
  shapes = jax.eval_shape(task.init, jax.random.PRNGKey(0), fake_batch(BATCH, CROP, 3))
  assert shapes["params"]["log_temperature"].shape == ()  # Where derived() reads it.
  tau = task.derived({"params": {"log_temperature": np.log(np.float32(0.05))}})["tau"]
  np.testing.assert_allclose(tau, 0.05, rtol=1e-6)
  assert np.isinf(task.derived({"params": {"log_temperature": np.float32(88.8)}})["tau"])
  plain = experiment.make_task(_config(cmpa=None), clip=CLIP(TINY_CLIP))
  assert plain.derived({"params": {"decoder": {}}}) == {}
