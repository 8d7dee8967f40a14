"""Damaged checkpoints (torn writes, bad disks): a resume moves the damaged ones aside, never
deleting them, and continues exactly from the newest intact one; a readable checkpoint of another
model stays a mismatch error; with none intact, one clear error and nothing moved."""

import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from toy_train_task import ToyData, ToyTask, toy_frozen

from configs.base import get_config
from ssr_jax.train.checkpoint import (
  CheckpointDamagedError,
  Checkpointer,
  CheckpointMismatchError,
  checkpoint_dir,
  damage,
  restore_variables,
)
from ssr_jax.train.loop import train
from ssr_jax.train.sharding import make_mesh, replicated

STEPS = 12
TASK = ToyTask(switch_step=5)


def _config():
  c = get_config()
  c.seed = 0
  c.train.update(
    dict(batch_size=8, num_steps=STEPS, log_every=4, checkpoint_every=4, keep_checkpoints=3)
  )
  c.train.update(dict(warmup_steps=3, learning_rate=1e-2))
  return c


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run (checkpoints 4, 8, 12) and its final params."""
  workdir = tmp_path_factory.mktemp("trained")
  state = train(_config(), workdir, task=TASK, frozen=toy_frozen(), make_iterator=ToyData(8))
  return workdir, _params(state)


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) * 6 // 10])


def _truncate_arrays(step_dir):
  for path in (step_dir / "state").rglob("d/*"):  # Every OCDBT data file: a torn write.
    _truncate(path)


# (damage, tag of the directory it is moved to, reason in the log line)
DAMAGES = {
  "truncated data files": (_truncate_arrays, "unreadable-state", "its arrays cannot be read"),
  "state/_METADATA deleted": (
    lambda d: (d / "state" / "_METADATA").unlink(),
    "missing-state-METADATA",
    "state/_METADATA is missing",
  ),
  "manifest.ocdbt deleted": (
    lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "missing-state-manifest.ocdbt",
    "state/manifest.ocdbt is missing",
  ),
  "config/metadata truncated": (
    lambda d: _truncate(d / "config" / "metadata"),
    "unparsable-config-metadata",
    "config/metadata is not valid JSON",
  ),
}


def _copy(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  return workdir, pathlib.Path(checkpoint_dir(workdir))


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_damaged_latest_is_moved_aside_and_the_run_resumes_exactly(trained, tmp_path, caplog, kind):
  workdir, ckdir = _copy(trained, tmp_path)
  hurt, tag, why = DAMAGES[kind]
  hurt(ckdir / "12")
  found = damage(ckdir / "12")  # Files missing or unparsable; truncated arrays show when read.
  assert (found is None) if tag == "unreadable-state" else (found[0] == tag)
  data = ToyData(8)
  with caplog.at_level(logging.WARNING, logger="ssr_jax.train.checkpoint"):
    state = train(_config(), workdir, task=TASK, frozen=toy_frozen(), make_iterator=data)
  lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
  moved = ckdir / "corrupt" / f"12-{tag}"
  assert len(lines) == 1 and "\n" not in lines[0]
  assert lines[0].startswith(f"Checkpoint {ckdir / '12'} is damaged ({why}")
  assert lines[0].endswith(f"): moved it to {moved}, resuming from step 8.")
  # Nothing deleted: the damaged files are kept as they were.
  assert moved.is_dir() and (moved / "config").is_dir()
  # The data restarted at step 8 once the damage was found; the run ends as if never damaged.
  assert data.starts == [12, 8] and data.consumed[1:] == list(range(8, STEPS))
  assert int(state.step) == STEPS
  for a, b in zip(jax.tree.leaves(_params(state)), jax.tree.leaves(trained[1])):
    np.testing.assert_array_equal(a, b)
  with Checkpointer(workdir) as ckpt:
    assert ckpt.all_steps() == [4, 8, 12]


def test_every_checkpoint_damaged_is_one_error_and_nothing_moves(trained, tmp_path):
  workdir, ckdir = _copy(trained, tmp_path)
  for step, kind in zip((4, 8, 12), list(DAMAGES)[1:]):
    DAMAGES[kind][0](ckdir / str(step))
  before = sorted(os.listdir(ckdir))
  with pytest.raises(CheckpointDamagedError) as e:
    train(_config(), workdir, task=TASK, frozen=toy_frozen(), make_iterator=ToyData(8))
  msg = str(e.value)
  assert "\n" not in msg and f"No intact checkpoint in {ckdir}" in msg
  assert "12: config/metadata is not valid JSON" in msg
  assert "8: state/manifest.ocdbt is missing" in msg and "4: state/_METADATA is missing" in msg
  assert "Nothing was moved or deleted" in msg
  assert sorted(os.listdir(ckdir)) == before


def test_real_mismatch_is_not_taken_for_damage(trained, tmp_path):
  workdir, ckdir = _copy(trained, tmp_path)
  DAMAGES["state/_METADATA deleted"][0](ckdir / "12")  # The newest damaged, the next readable.
  with pytest.raises(CheckpointMismatchError, match="does not match the model being restored"):
    train(_config(), workdir, task=ToyTask(hidden=8), frozen=toy_frozen(), make_iterator=ToyData(8))
  assert sorted(os.listdir(ckdir)) == ["12", "4", "8"]  # Nothing moved.


def test_evaluation_of_a_damaged_checkpoint_names_it(trained, tmp_path):
  workdir, ckdir = _copy(trained, tmp_path)
  target = {"params": jax.eval_shape(lambda: TASK.init(jax.random.PRNGKey(0), None))["params"]}
  repl = replicated(make_mesh(jax.local_devices()[:1]))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), target)
  for kind in ("state/_METADATA deleted", "truncated data files"):
    hurt, _, why = DAMAGES[kind]
    hurt(ckdir / "12")
    with pytest.raises(CheckpointDamagedError) as e:
      restore_variables(workdir, target)
    assert f"Checkpoint {ckdir / '12'} is damaged ({why}" in str(e.value)
    assert "--config.eval.checkpoint_step" in str(e.value) and "\n" not in str(e.value)
    shutil.rmtree(ckdir / "12")
    shutil.copytree(pathlib.Path(checkpoint_dir(trained[0])) / "12", ckdir / "12")
  variables, step = restore_variables(workdir, target)
  assert step == STEPS
  for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(trained[1])):
    np.testing.assert_array_equal(a, b)
