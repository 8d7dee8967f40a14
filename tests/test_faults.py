"""Fault injection through launch.py on the tiny demo (shipped tiny CLIP, 32 training images):
every run must end within a time bound with the right exit status and one line saying what
happened, and lose nothing (a resumed run ends bit-identical to an uninterrupted one).

Faults are injected at deterministic points by tests/fault_hooks.py (SIGKILL at a step and in the
last moment of a save, SIGTERM at a step, during evaluation and during data preparation, a slow
input stream); checkpoint damage is done to the files. Time bounds catch hangs (subprocess
timeouts), not speed.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6
# The demo at its smallest that the shipped tiny CLIP still fits (96 px crops); DINO's weights are
# named so that the demo does not check them against this smaller training set (and pretrain
# one).
TINY = [
  "--config=configs/demo.py",
  "--config.data.synthetic.num_train=32",
  "--config.data.synthetic.num_val=8",
  "--config.data.source=files",
  "--config.model.cam.par_iters=2",
  "--config.model.decoder.embed_dim=16",
  "--config.model.decoder.num_heads=2",
  "--config.model.cmpa.refresh_every=2",
  "--config.model.cmpa.bank_size=32",
  "--config.train.batch_size=8",
  "--config.train.warmup_steps=2",
  "--config.train.log_every=2",
  "--config.train.checkpoint_every=2",
  f"--config.train.num_steps={STEPS}",
  "--config.eval.batch_size=8",
  "--config.eval.num_vis=1",
  "--config.eval.targets=('seg',)",
  "--config.eval.splits=('val',)",
  f"--config.dino.weights={REPO / 'ssr_jax' / 'assets' / 'tiny_dino.npz'}",
]
BOUND_S = 900  # Per run, on a busy 2-core machine: past it, the run hung.


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: one CPU device, a compilation cache shared by the runs."""
  e = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  e.pop("XLA_FLAGS", None)
  e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return e


def launch(env, workdir, *args, faults=(), mode="train_and_eval", data_root=None):
  """Runs launch.py (through fault_hooks when `faults` are given); returns the CompletedProcess.

  Fails the test if the process is still running after BOUND_S (and kills its process group).
  """
  cmd = [sys.executable, "launch.py"]
  if faults:
    cmd = [sys.executable, "-m", "tests.fault_hooks", *faults, "--"]
  cmd += [*TINY, f"--workdir={workdir}", f"--mode={mode}", *args]
  if data_root is not None:
    cmd.append(f"--config.data.root={data_root}")
  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    out, err = proc.communicate(timeout=BOUND_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    pytest.fail(f"{' '.join(cmd[-3:])} hung (> {BOUND_S} s); stderr tail:\n{err[-3000:]}")
  assert "Timeout (" not in err, "the exit backstop fired: shutdown blocked"
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def final_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip()][-1]


def read_state(workdir, step):
  """The saved TrainState of checkpoint `step` as numpy arrays (a nested dict)."""
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  return ocp.PyTreeCheckpointer().restore(path)


def leaves(tree, prefix=""):
  """(path, numpy array) of every leaf of a restored tree of dicts and lists."""
  if isinstance(tree, dict):
    for k, v in sorted(tree.items()):
      yield from leaves(v, f"{prefix}{k}/")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from leaves(v, f"{prefix}{i}/")
  else:
    yield prefix[:-1], np.asarray(tree)


def assert_same_state(a, b):
  la, lb = dict(leaves(a)), dict(leaves(b))
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """An uninterrupted train_and_eval run (its workdir); also makes the data every run reads."""
  workdir = tmp_path_factory.mktemp("reference")
  res = launch(env, workdir)
  assert res.returncode == 0, res.stderr[-3000:]
  assert steps(workdir) == [2, 4, 6]
  return workdir


def data_root(reference):
  return reference / "data"


def test_sigkill_anywhere_then_resume_is_bit_identical(env, reference, tmp_path):
  """SIGKILL at a step (chosen by a seeded draw), then in the last moment of a save, then a
  rerun to the end: the final state equals the uninterrupted run's, bit for bit."""
  root = data_root(reference)
  kill_step = int(np.random.default_rng(0).integers(1, 4))  # In [1, 4): before or at a save.
  res = launch(env, tmp_path, faults=[f"sigkill_at={kill_step}"], mode="train", data_root=root)
  assert res.returncode == -signal.SIGKILL
  res = launch(env, tmp_path, faults=["sigkill_in_save=4"], mode="train", data_root=root)
  assert res.returncode == -signal.SIGKILL
  names = os.listdir(tmp_path / "checkpoints")
  assert "4" not in names and any(n.startswith("4.orbax-checkpoint-tmp") for n in names)
  res = launch(env, tmp_path, mode="train", data_root=root)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Resumed from" in res.stderr and final_line(res.stdout).startswith("train done in")
  assert steps(tmp_path) == [2, 4, 6]
  assert_same_state(read_state(tmp_path, STEPS), read_state(reference, STEPS))


def test_sigterm_in_train_and_eval_saves_skips_eval_and_resumes(env, reference, tmp_path):
  root = data_root(reference)
  res = launch(env, tmp_path, faults=["sigterm_at=3"], data_root=root)
  assert res.returncode == 0, res.stderr[-3000:]
  assert final_line(res.stdout) == (
    "SIGTERM: --mode train_and_eval stopped early; the run is incomplete. Training resumes from "
    "its latest checkpoint and evaluation restarts: rerun the same command."
  )
  assert "SIGTERM: saved a checkpoint at step 4" in res.stderr
  assert steps(tmp_path) == [2, 4] and not (tmp_path / "eval").exists()  # No evaluation.
  res = launch(env, tmp_path, data_root=root)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Resumed from" in res.stderr
  metrics = json.loads((tmp_path / "eval" / "metrics_val_seg.json").read_text())
  assert metrics["checkpoint_step"] == STEPS
  reference_metrics = json.loads((reference / "eval" / "metrics_val_seg.json").read_text())
  assert metrics["miou"] == reference_metrics["miou"]
  assert_same_state(read_state(tmp_path, STEPS), read_state(reference, STEPS))


def test_sigterm_in_eval_mode_stops_without_metrics(env, reference, tmp_path):
  shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
  res = launch(
    env, tmp_path, faults=["sigterm_in_eval"], mode="eval", data_root=data_root(reference)
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert final_line(res.stdout).startswith("SIGTERM: --mode eval stopped early; the run is")
  assert not (tmp_path / "eval" / "metrics_val_seg.json").exists()
  assert steps(tmp_path) == [2, 4, 6]  # Untouched.


def test_sigterm_in_ablation_mode_stops_before_training(env, reference, tmp_path):
  """SIGTERM outside training (here the data preparation): the run stops where it is."""
  res = launch(
    env, tmp_path, faults=["sigterm_in_prepare"], mode="ablation", data_root=data_root(reference)
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert final_line(res.stdout).startswith("SIGTERM: --mode ablation stopped early; the run is")
  assert not (tmp_path / "ablation.md").exists() and not (tmp_path / "ablation").exists()


def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(env, reference, tmp_path):
  shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
  data = tmp_path / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d"
  for path in data.iterdir():  # A torn write of the arrays.
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
  res = launch(env, tmp_path, mode="train", data_root=data_root(reference))
  assert res.returncode == 0, res.stderr[-3000:]
  (line,) = [x for x in res.stderr.splitlines() if "is damaged" in x]
  moved = tmp_path / "checkpoints" / "corrupt" / "6-unreadable-state"
  assert "/checkpoints/6 is damaged (its arrays cannot be read: " in line
  assert line.endswith(f"): moved it to {moved}, resuming from step 4.")
  assert moved.is_dir()  # Kept, not deleted.
  assert_same_state(read_state(tmp_path, STEPS), read_state(reference, STEPS))


def test_error_exit_with_input_in_flight_ends_promptly(env, reference, tmp_path):
  """A bad image stops training while the tf.data pipeline is busy (a slow input stream): the
  error is one line, the status 1, and the process ends (it used to hang at shutdown)."""
  root = tmp_path / "data"
  shutil.copytree(data_root(reference), root)
  image = root / "JPEGImages" / "train_00003.png"
  image.write_bytes(image.read_bytes()[: image.stat().st_size * 6 // 10])
  res = launch(
    env,
    tmp_path / "run",
    "--config.data.pipeline=tf",
    "--config.data.verify=none",  # The start-up check would find the file before training.
    faults=["slow_input=0.2"],
    mode="train",
    data_root=root,
  )
  assert res.returncode == 1
  line = final_line(res.stderr)
  assert line.startswith(f"error: cannot decode image {image} (image file is truncated)"), line


def test_nan_guard_stop_exits_and_every_checkpoint_is_finite(env, reference, tmp_path):
  """lr 1e4 blows up CMPA's log-temperature: the guard stops with one line naming the last good
  checkpoint, and no checkpoint holds a non-finite value or an overflowing tau."""
  res = launch(
    env,
    tmp_path,
    "--config.train.learning_rate=1e4",
    "--config.train.heads.learning_rate=1e4",
    "--config.train.checkpoint_every=1",
    mode="train",
    data_root=data_root(reference),
  )
  assert res.returncode == 1
  line = final_line(res.stderr)
  assert line.startswith("error: Non-finite ") and "(train.nan_policy='halt')" in line, line
  saved = steps(tmp_path)
  if saved:
    assert f"the last good checkpoint is step {saved[-1]} in " in line
  for step in saved:
    state = read_state(tmp_path, step)
    bad = [n for n, x in leaves(state) if x.dtype.kind == "f" and not np.isfinite(x).all()]
    assert not bad, (step, bad)
    assert float(state["params"]["log_temperature"]) < np.log(np.finfo(np.float32).max), step
