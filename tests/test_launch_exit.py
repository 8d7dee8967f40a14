"""launch.py's last resort: a process whose way out blocks (a thread that never ends, an exit
handler or a destructor that waits forever) still ends, with its thread stacks printed."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BLOCKED_EXIT = """
import sys, threading, time
from absl import app
import launch
from ssr_jax import experiment

def run(mode, config, workdir):  # The work is done; a non-daemon thread then blocks the exit.
  threading.Thread(target=time.sleep, args=(3600,), name="never-ends").start()

experiment.run = run
launch.EXIT_GRACE_S = 2.0
sys.argv = ["launch.py", "--config=configs/demo.py", "--workdir=" + sys.argv[1]]
app.run(launch.main, flags_parser=launch._parse_flags)
"""


def test_blocked_exit_ends_with_status_1_and_stacks(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  res = subprocess.run(
    [sys.executable, "-c", _BLOCKED_EXIT, str(tmp_path)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,  # A bound on a hang, not a speed figure: the backstop fires 2 s after the work.
  )
  assert res.returncode == 1
  assert "Timeout (0:00:02)!" in res.stderr
  assert "most recent call first" in res.stderr  # The stacks, to see what blocked.
