"""The train loop end to end on the toy task: exact resume, SIGTERM, NaN guard, eval, logs."""

import json
import logging
import signal
import struct

import jax
import numpy as np
import pytest
from toy_train_task import TemperatureTask, ToyData, ToyTask, toy_frozen, toy_state

from configs.base import get_config
from ssr_jax.train.checkpoint import Checkpointer, abstract_state, checkpoint_dir
from ssr_jax.train.loop import NonFiniteError, train
from ssr_jax.train.sharding import make_mesh, replicated

STEPS = 12
TASK = ToyTask(switch_step=5)
# What a NaN loss at one step makes non-finite: its terms, its gradients, and (under "halt", where
# the update is applied) the params and optimizer state it makes.
BAD = ["aux", "grads", "loss", "state/opt_state", "state/params"]


def _config(**train_overrides):
  c = get_config()
  c.seed = 0
  c.train.update(
    dict(
      batch_size=8,
      num_steps=STEPS,
      log_every=4,
      checkpoint_every=4,
      keep_checkpoints=2,
      warmup_steps=3,
      learning_rate=1e-2,
    )
  )
  c.train.update(train_overrides)
  return c


def _tensorboard_events(workdir) -> set:
  """(tag, step, "scalar" | "image") of every value in the TFRecord event files."""
  from tensorboardX.proto import event_pb2

  out = set()
  for path in (workdir / "tensorboard").glob("events.out.tfevents.*"):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      i += 12 + n + 4  # length, its crc, payload, payload crc
      for v in event.summary.value:
        out.add((v.tag, event.step, "image" if v.HasField("image") else "scalar"))
  return out


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """12 steps in one go: final params, workdir and the data steps consumed."""
  workdir = tmp_path_factory.mktemp("straight")
  data = ToyData(8)
  state = train(
    _config(), workdir, task=TASK, frozen=toy_frozen(), make_iterator=data, clip_fingerprint="fp0"
  )
  assert int(state.step) == STEPS
  return {"params": _params(state), "workdir": workdir, "data": data}


def test_straight_run_logs_and_checkpoints(straight, caplog):
  workdir = straight["workdir"]
  assert straight["data"].starts == [0] and straight["data"].consumed == list(range(STEPS))
  records = [
    json.loads(line) for line in (workdir / "train_metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in records] == [4, 8, 12]
  for r in records:
    assert {"loss", "mse", "aux", "lr", "grad_norm", "param_norm", "steps_per_sec"} <= set(r)
    assert r["loss"] == pytest.approx(r["mse"] + r["aux"], rel=1e-5)
  # lr is the rate of the interval's last update (step 11): 1e-2 * (1 - 11/12).
  assert records[-1]["lr"] == pytest.approx(1e-2 / 12, rel=1e-5)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  with Checkpointer(workdir) as ckpt:
    assert ckpt.all_steps() == [8, 12]  # keep_checkpoints=2
    meta = ckpt.read_config()
  assert meta["meta"]["clip_fingerprint"] == "fp0" and meta["meta"]["data_step"] == STEPS
  assert meta["meta"]["jax_version"] == jax.__version__
  assert meta["config"]["train"]["num_steps"] == STEPS


def test_crash_and_resume_is_exact(straight, tmp_path, caplog):
  data = ToyData(8, crash_at=6)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train(_config(), tmp_path, task=TASK, frozen=toy_frozen(), make_iterator=data)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [4]
  data = ToyData(8)
  with caplog.at_level(logging.INFO, logger="ssr_jax.train.loop"):
    state = train(_config(), tmp_path, task=TASK, frozen=toy_frozen(), make_iterator=data)
  assert data.starts == [4] and data.consumed == list(range(4, STEPS))
  assert int(state.step) == STEPS
  _assert_same(_params(state), straight["params"])
  assert "Resumed from" in caplog.text
  assert "Train step compiled 1 time(s)." in caplog.text  # The traced RFM-like switch at step 5.
  steps = [
    json.loads(x)["step"] for x in (tmp_path / "train_metrics.jsonl").read_text().splitlines()
  ]
  assert steps == [4, 8, 12]


def test_sigterm_saves_at_next_step_and_resume_continues(straight, tmp_path, caplog):
  before = signal.getsignal(signal.SIGTERM)
  data = ToyData(8, sigterm_at=6)  # Arrives while step 6's batch is fetched.
  with caplog.at_level(logging.INFO, logger="ssr_jax.train.loop"):
    state = train(_config(), tmp_path, task=TASK, frozen=toy_frozen(), make_iterator=data)
  assert int(state.step) == 7 and data.consumed[-1] == 6 and data.closed == 1
  assert "SIGTERM: saved a checkpoint at step 7" in caplog.text
  assert signal.getsignal(signal.SIGTERM) is before  # Handler restored.
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 7
  data = ToyData(8)
  state = train(_config(), tmp_path, task=TASK, frozen=toy_frozen(), make_iterator=data)
  assert data.starts == [7] and int(state.step) == STEPS
  _assert_same(_params(state), straight["params"])


def test_nan_halt_names_step_and_term_and_keeps_good_checkpoint(tmp_path):
  cfg = _config(checkpoint_every=2, log_every=4)
  task = ToyTask(switch_step=0, nan_step=5)
  data = ToyData(8)
  with pytest.raises(NonFiniteError) as e:
    train(cfg, tmp_path, task=task, frozen=toy_frozen(), make_iterator=data)
  # The input was ended before the error left train(), though the error (whose traceback holds
  # train's frame) is still alive: nothing is left to interpreter shutdown.
  assert data.closed == 1
  err = e.value
  # Caught at the save of step 6, between log steps: the terms come from step 5's measurements
  # (step 6's, after the NaN update, would add "mse").
  assert err.step == 5 and err.terms == BAD
  assert f"Non-finite {', '.join(BAD)} at step 5" in str(err)
  assert "the last good checkpoint is step 4" in str(err)
  # The save at step 6 (after the bad update) was refused; step 4 is the latest and is intact.
  assert err.checkpoint_step == 4
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [2, 4]
    mesh = make_mesh()
    target = ckpt.restore(abstract_state(jax.eval_shape(lambda: toy_state(mesh)), replicated(mesh)))
  assert int(target.step) == 4 and int(target.nonfinite_step) == -1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(target.params))


def test_nan_halt_on_overflowing_derived_value_never_saves_it(tmp_path):
  """tau = exp(log_temperature) overflows while log_temperature, the loss and the gradients are
  finite: the update that makes it trips the guard, that state is never saved, and the named
  checkpoint is one whose tau is finite."""
  cfg = _config(checkpoint_every=1, log_every=4, warmup_steps=0)
  cfg.train.heads.learning_rate = 30.0  # Adam moves log_temperature by about that per step.
  task = TemperatureTask(switch_step=0, push=1.0)
  with pytest.raises(NonFiniteError) as e:
    train(cfg, tmp_path, task=task, frozen=toy_frozen(), make_iterator=ToyData(8))
  err = e.value
  assert err.terms == ["state/tau"] and f"the last good checkpoint is step {err.step}" in str(err)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps()[-1] == err.checkpoint_step == err.step
    mesh = make_mesh()
    good = toy_state(mesh, task=task, train_cfg=cfg.train)
    saved = ckpt.restore(abstract_state(jax.eval_shape(lambda: good), replicated(mesh)))
  log_t = float(saved.params["log_temperature"])
  assert 30.0 < log_t < np.log(np.finfo(np.float32).max)  # Moved up, and exp() still finite.
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved))


@pytest.mark.parametrize("nan_step", [4, 5, 7])
def test_nan_halt_at_log_step_names_first_bad_step(tmp_path, nan_step):
  """Caught at the log step 8 only: the first bad step of the fetched interval is reported, not
  the later ones (where the NaN parameters make "mse" non-finite too)."""
  cfg = _config(checkpoint_every=0, log_every=4)
  task = ToyTask(switch_step=0, nan_step=nan_step)
  with pytest.raises(NonFiniteError) as e:
    train(cfg, tmp_path, task=task, frozen=toy_frozen(), make_iterator=ToyData(8))
  assert e.value.step == nan_step and e.value.terms == BAD
  assert e.value.checkpoint_step is None


def test_nan_halt_before_eval(tmp_path):
  seen = []
  cfg = _config(checkpoint_every=0, log_every=6, eval_every=4)
  task = ToyTask(switch_step=0, nan_step=2)
  with pytest.raises(NonFiniteError) as e:
    train(
      cfg,
      tmp_path,
      task=task,
      frozen=toy_frozen(),
      make_iterator=ToyData(8),
      eval_fn=lambda state, step: seen.append(step) or {"miou": 0.0},
    )
  assert e.value.step == 2 and e.value.terms == BAD and not seen


def test_nan_skip_completes_with_finite_params(tmp_path, caplog):
  task = ToyTask(switch_step=0, nan_step=5)
  with caplog.at_level(logging.WARNING, logger="ssr_jax.train.loop"):
    state = train(
      _config(nan_policy="skip"), tmp_path, task=task, frozen=toy_frozen(), make_iterator=ToyData(8)
    )
  assert int(state.step) == STEPS and int(state.nonfinite_count) == 1
  assert int(state.nonfinite_step) == 5
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(state)))
  assert f"Skipped 1 bad update(s) (non-finite values; first at step 5: {', '.join(BAD)})" in (
    caplog.text
  )


def test_eval_hook_logs_and_keeps_best_checkpoint(tmp_path):
  scores = {4: 0.5, 8: 0.9, 12: 0.3}
  seen = []

  def eval_fn(state, step):
    seen.append((step, int(state.step)))
    img = np.full((6, 5, 3), step, np.uint8)
    return {"miou": scores[step], "images": {"grid": img}, "pixel_acc": 0.8}

  cfg = _config(eval_every=4, checkpoint_every=2, keep_checkpoints=1)
  train(cfg, tmp_path, task=TASK, frozen=toy_frozen(), make_iterator=ToyData(8), eval_fn=eval_fn)
  assert seen == [(4, 4), (8, 8), (12, 12)]
  records = [json.loads(x) for x in (tmp_path / "eval_metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["miou"], r["pixel_acc"]) for r in records] == [
    (4, 0.5, 0.8),
    (8, 0.9, 0.8),
    (12, 0.3, 0.8),
  ]
  events = _tensorboard_events(tmp_path)
  for step in (4, 8, 12):
    assert {("train/loss", step, "scalar"), ("train/aux", step, "scalar")} <= events
    assert {("eval/miou", step, "scalar"), ("eval/grid", step, "image")} <= events
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [8, 12] and ckpt.best_step() == 8
    assert ckpt.metrics(8) == {"miou": 0.9}
  assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["12", "8"]


def test_train_leaves_distributed_setup_to_the_entry_point(tmp_path, monkeypatch):
  """jax cannot initialise the distributed system once devices were touched: train() never tries."""

  def refuse(*args, **kwargs):
    raise AssertionError("train() called jax.distributed.initialize")

  monkeypatch.setattr(jax.distributed, "initialize", refuse)
  cfg = _config(num_steps=2, log_every=1, checkpoint_every=0)
  if "distributed" in cfg.train:
    cfg.train.distributed = True
  state = train(cfg, tmp_path, task=TASK, frozen=toy_frozen(), make_iterator=ToyData(8))
  assert int(state.step) == 2


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="train.batch_size=6"):
    train(_config(batch_size=6), tmp_path, task=TASK, frozen={}, make_iterator=ToyData(6))
  with pytest.raises(ValueError, match="train.batch_size is 16"):
    train(_config(batch_size=16), tmp_path, task=TASK, frozen={}, make_iterator=ToyData(8))
  with pytest.raises(ValueError, match="train.nan_policy"):
    train(_config(nan_policy="ignore"), tmp_path, task=TASK, frozen={}, make_iterator=ToyData(8))
