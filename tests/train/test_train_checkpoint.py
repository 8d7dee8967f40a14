"""Orbax checkpoints: round trip onto another mesh, mismatch errors, retention, atomicity."""

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_train_task import ToyTask, toy_state

from configs.base import get_config
from ssr_jax.train.checkpoint import (
  Checkpointer,
  CheckpointMismatchError,
  abstract_state,
  checkpoint_dir,
  config_diff,
  config_json,
  restore,
  restore_checked,
)
from ssr_jax.train.sharding import make_mesh, replicated

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(value):
  return {"w": jnp.full((3,), value, jnp.float32)}


def test_round_trip_onto_a_different_device_count(tmp_path):
  state = toy_state(make_mesh())
  state = state.replace(step=jnp.int32(7))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(7, state, config={"config": {"a": 1}, "meta": {"data_step": 7}})
    ckpt.wait_until_finished()
    assert ckpt.read_config() == {"config": {"a": 1}, "meta": {"data_step": 7}}
  mesh1 = make_mesh(jax.devices()[:1])
  target = abstract_state(jax.eval_shape(lambda: state), replicated(mesh1))
  restored = restore(tmp_path, target)
  assert int(restored.step) == 7
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.sharding == replicated(mesh1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_model_names_path_and_shapes(tmp_path):
  mesh = make_mesh()
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(2, toy_state(mesh, task=ToyTask(hidden=16)), config={})
  target = abstract_state(
    jax.eval_shape(lambda: toy_state(mesh, task=ToyTask(hidden=8))), replicated(mesh)
  )
  with pytest.raises(CheckpointMismatchError) as e:
    restore(tmp_path, target)
  msg = str(e.value)
  assert "params/hidden/kernel: checkpoint shape (8, 16) vs model shape (8, 8)" in msg
  assert "params/out/kernel: checkpoint shape (16, 3) vs model shape (8, 3)" in msg
  # The optimizer moments are named too (in the decoder group's AdamW state).
  assert re.search(r"opt_state/\S*decoder\S*/mu/hidden/bias", msg), msg


def test_config_diff_lists_dotted_fields():
  saved = {"seed": 0, "train": {"lr": 1.0, "steps": 5}, "gone": 1}
  now = {"seed": 0, "train": {"lr": 2.0, "steps": 5}, "new": {"x": True}}
  assert config_diff(saved, now) == [
    "  gone: checkpoint 1 vs now '<absent>'",
    "  new.x: checkpoint '<absent>' vs now True",
    "  train.lr: checkpoint 1.0 vs now 2.0",
  ]


def test_restore_checked_names_config_fields_and_warns_on_new_clip(tmp_path, caplog):
  mesh = make_mesh()
  saved_cfg = get_config()
  record = {"config": config_json(saved_cfg), "meta": {"clip_fingerprint": "fp0"}}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(2, toy_state(mesh, task=ToyTask(hidden=16)), config=record)
  now_cfg = get_config()
  now_cfg.train.learning_rate = 123.0
  small = abstract_state(
    jax.eval_shape(lambda: toy_state(mesh, task=ToyTask(hidden=8))), replicated(mesh)
  )
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointMismatchError) as e:
      restore_checked(ckpt, small, step=2, config=now_cfg, clip_fingerprint="fp0")
    msg = str(e.value)
    assert "params/hidden/kernel: checkpoint shape (8, 16) vs model shape (8, 8)" in msg
    lr = saved_cfg.train.learning_rate
    want = f"  train.learning_rate: checkpoint {lr!r} vs now 123.0"
    assert f"Config fields that differ from the checkpoint's:\n{want}" in msg
    same = abstract_state(jax.eval_shape(lambda: toy_state(mesh)), replicated(mesh))
    with caplog.at_level(logging.WARNING, logger="ssr_jax.train.checkpoint"):
      state = restore_checked(ckpt, same, step=2, config=saved_cfg, clip_fingerprint="fp1")
  assert int(state.step) == 0
  assert "different frozen CLIP weights: checkpoint fingerprint 'fp0', now 'fp1'" in caplog.text


def test_missing_checkpoints_give_clear_errors(tmp_path):
  target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=replicated(make_mesh()))}
  with pytest.raises(FileNotFoundError, match="No checkpoint directory .*nowhere"):
    restore(tmp_path / "nowhere", target)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="No finished checkpoint"):
      ckpt.restore(target)
    ckpt.save(1, _tiny(1.0), config={})
    ckpt.wait_until_finished()
    with pytest.raises(FileNotFoundError, match=r"available steps: \[1\]"):
      ckpt.restore(target, step=5)


def test_keeps_last_n_and_best_across_restarts(tmp_path):
  miou = {2: 0.40, 4: 0.70, 6: 0.50, 8: None, 10: None, 12: 0.60, 14: None}
  with Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
    for step in (2, 4, 6, 8, 10):
      m = None if miou[step] is None else {"miou": miou[step]}
      assert ckpt.save(step, _tiny(step), config={}, metrics=m)
    # Last 2 (8, 10) plus the best (4); 2 and 6 had metrics but were neither.
    assert ckpt.all_steps() == [4, 8, 10]
    assert ckpt.best_step() == 4
    assert not ckpt.save(10, _tiny(10), config={})  # Already saved: no-op.
  assert sorted(os.listdir(checkpoint_dir(tmp_path))) == ["10", "4", "8"]
  # A new manager (a restarted run) still knows step 4's mIoU.
  with Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
    assert ckpt.best_step() == 4
    for step in (12, 14):
      m = None if miou[step] is None else {"miou": miou[step]}
      ckpt.save(step, _tiny(step), config={}, metrics=m)
    assert ckpt.all_steps() == [4, 12, 14]
    target = abstract_state(_tiny(0.0), replicated(make_mesh()))
    np.testing.assert_array_equal(ckpt.restore(target, step=4)["w"], [4.0] * 3)
  # Without any evaluation, only the last N survive and there is no best.
  with Checkpointer(tmp_path / "plain", keep=2, async_save=False) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _tiny(step), config={})
    assert ckpt.all_steps() == [2, 3] and ckpt.best_step() is None


def test_leftover_temporary_directory_is_ignored(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, _tiny(3.0), config={})
  junk = checkpoint_dir(tmp_path) / "5.orbax-checkpoint-tmp-1234"
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "garbage").write_text("half written")
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
    target = abstract_state(_tiny(0.0), replicated(make_mesh()))
    np.testing.assert_array_equal(ckpt.restore(target)["w"], [3.0] * 3)


_KILLED_SAVER = textwrap.dedent(
  """
  import os, sys, time
  import jax.numpy as jnp
  from orbax.checkpoint._src.path import atomicity
  from ssr_jax.train.checkpoint import Checkpointer
  workdir = sys.argv[1]
  ckpt = Checkpointer(workdir)
  ckpt.save(1, {"w": jnp.full((3,), 1.0)}, config={"step": 1})
  ckpt.wait_until_finished()

  async def hang(self):  # Everything is written; stop right before the atomic rename.
    open(os.path.join(workdir, "MARK"), "w").close()
    time.sleep(600)

  atomicity.AtomicRenameTemporaryPath.finalize = hang
  ckpt.save(2, {"w": jnp.full((3,), 2.0)}, config={"step": 2})
  ckpt.wait_until_finished()
  """
)


def test_save_killed_midway_is_never_picked_up(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(
    [sys.executable, "-c", _KILLED_SAVER, str(tmp_path)], env=env, stderr=subprocess.PIPE
  )
  try:
    deadline = time.monotonic() + 60
    while not (tmp_path / "MARK").exists():
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      assert time.monotonic() < deadline, "the saver never reached the rename"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  names = os.listdir(checkpoint_dir(tmp_path))
  assert "1" in names and "2" not in names
  assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names)
  target = abstract_state(_tiny(0.0), replicated(make_mesh()))
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    np.testing.assert_array_equal(ckpt.restore(target)["w"], [1.0] * 3)
    # The step can be saved again; the stale temporary directory does not get in the way.
    ckpt.save(2, _tiny(5.0), config={})
    ckpt.wait_until_finished()
    np.testing.assert_array_equal(ckpt.restore(target)["w"], [5.0] * 3)
  assert not any("tmp" in n for n in os.listdir(checkpoint_dir(tmp_path)))
