"""Input pipelines release their threads, tf.data iterators and worker processes when they end,
on an error too, instead of leaving them to interpreter shutdown (where tf.data's hung the exit),
and worker processes never outlive their parent."""

import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import weakref

import pytest
from conftest import synthetic_config

from ssr_jax.data import pipeline
from ssr_jax.data.files import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def live_tf_iterators(monkeypatch):
  """Weak references to every tf.data iterator made while the test runs."""
  from tensorflow.python.data.ops import iterator_ops

  made = []
  init = iterator_ops.OwnedIterator.__init__

  def recording_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    made.append(weakref.ref(self))

  monkeypatch.setattr(iterator_ops.OwnedIterator, "__init__", recording_init)

  def alive():
    gc.collect()
    return [r for r in made if r() is not None]

  return made, alive


def _truncated_copy(syn_root, tmp_path):
  root = tmp_path / "data"
  shutil.copytree(syn_root, root)
  image = root / "JPEGImages" / "train_00003.png"
  data = image.read_bytes()
  image.write_bytes(data[: len(data) * 6 // 10])
  return root


def test_tf_iterator_released_after_a_bad_file_even_while_the_error_is_held(
  syn_root, tmp_path, live_tf_iterators
):
  made, alive = live_tf_iterators
  cfg = synthetic_config(_truncated_copy(syn_root, tmp_path))
  cfg.verify = "none"  # Let the stream meet the bad file (the start-up check would not).
  it = pipeline.make_train_iterator(cfg, batch_size=8, seed=0, superpixels=True, pipeline="tf")
  with pytest.raises(DataError, match="train_00003.png") as caught:
    for _ in range(8):  # 24 images, batches of 8: the bad one is within 3 steps.
      next(it)
  # The error, its traceback and its chained causes are alive (as in a process on its way out
  # with the error), yet the tf.data iterator is already gone.
  assert caught.value.__traceback__ is not None and len(made) == 1
  assert alive() == []


def test_tf_iterator_released_on_close(syn_root, live_tf_iterators):
  made, alive = live_tf_iterators
  cfg = synthetic_config(syn_root)
  it = pipeline.make_train_iterator(cfg, batch_size=8, seed=0, superpixels=True, pipeline="tf")
  next(it)
  assert len(alive()) == 1
  it.close()
  assert alive() == []


_PARENT = textwrap.dedent(
  """
  import sys, time
  from conftest import synthetic_config
  from ssr_jax.data import pipeline

  if __name__ == "__main__":
    cfg = synthetic_config(sys.argv[1], worker_type="process")
    it = pipeline.make_train_iterator(cfg, batch_size=8, seed=0, superpixels=True, pipeline="numpy")
    next(it)  # Workers up and busy prefetching.
    print("ready", flush=True)
    time.sleep(600)
  """
)


def _children(pid: int) -> list[int]:
  out = []
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(name))
      except (FileNotFoundError, ProcessLookupError):
        pass
  return out


def _ignores_sigterm(pid: int) -> bool:
  """Whether the kernel lists SIGTERM among the process's ignored signals (/proc status)."""
  with open(f"/proc/{pid}/status") as f:
    line = next(ln for ln in f if ln.startswith("SigIgn:"))
  return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def _running(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # A zombie has ended.
  except FileNotFoundError:
    return False


def test_process_workers_end_with_a_killed_parent_and_ignore_sigterm(syn_root, tmp_path):
  script = tmp_path / "parent.py"  # A file: spawned workers re-import __main__.
  script.write_text(_PARENT)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests", "data")])}
  parent = subprocess.Popen(
    [sys.executable, str(script), str(syn_root)], env=env, stdout=subprocess.PIPE
  )
  workers = []
  try:
    assert parent.stdout.readline().decode().strip() == "ready"
    workers += _children(parent.pid)
    assert len(workers) >= 2, workers  # 2 pool workers (and multiprocessing's resource tracker).
    # A spawned worker ignores SIGTERM once its initializer has run (after importing the
    # package); wait for the kernel to show that for each, within a bound (not a speed figure).
    deadline = time.monotonic() + 60
    while not all(_ignores_sigterm(pid) for pid in workers) and time.monotonic() < deadline:
      time.sleep(0.2)
    for pid in workers:  # A scheduler's SIGTERM to the process group leaves them to the parent.
      os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    assert all(_running(pid) for pid in workers)
    parent.kill()  # SIGKILL: no clean-up code of the parent runs.
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30  # A bound on the exit (a hang), not a speed figure.
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not [pid for pid in workers if _running(pid)], "workers outlived their killed parent"
  finally:
    parent.kill()
    for pid in workers:
      if _running(pid):
        os.kill(pid, signal.SIGKILL)
