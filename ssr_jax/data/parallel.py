"""Order-preserving parallel map for the offline data tools (COCO conversion, superpixels).

Worker processes are spawned, not forked: callers (training, the demo, tests) have usually
imported JAX, whose threads make fork() unsafe. Spawned workers re-import the main module, so
when it has no file (python -c, stdin, notebooks) threads are used instead. workers <= 1 runs
in this process.

Every worker process of `process_pool` ends itself within a second of its parent's death
(parent watch), so a killed run (SIGKILL, OOM killer) leaves no orphans behind, and ignores
SIGTERM: a scheduler signals the whole process group on preemption, and the parent, which decides
how to stop (save a checkpoint first), would otherwise find its pool broken.
"""

import concurrent.futures
import multiprocessing
import os
import signal
import sys
import threading
import time

PARENT_POLL_S = 0.5


def usable_cpus() -> int:
  """Cores this process may run on (its CPU affinity, which containers and taskset narrow;
  os.cpu_count() counts the whole machine)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def main_is_importable() -> bool:
  """Whether spawned processes can re-import __main__ (it is a file, not -c/stdin)."""
  path = getattr(sys.modules.get("__main__"), "__file__", None)
  return bool(path) and os.path.isfile(path)


def _watch_parent(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(PARENT_POLL_S)
  os._exit(1)  # Orphaned: the parent is gone, nobody will collect our results.


def _init_worker(parent: int, initializer) -> None:
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
  if initializer is not None:
    initializer()


def process_pool(workers: int, *, initializer=None) -> concurrent.futures.ProcessPoolExecutor:
  """A pool of `workers` spawned processes that die with this one and ignore SIGTERM.

  initializer (picklable, no arguments) runs once in each worker after that set-up.
  """
  ctx = multiprocessing.get_context("spawn")  # Not fork: JAX's threads make it unsafe.
  return concurrent.futures.ProcessPoolExecutor(
    workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(), initializer)
  )


def imap(fn, tasks, *, workers: int, chunksize: int = 16, initializer=None):
  """Yields fn(task) for each task, in order; fn and tasks must be picklable if workers > 1.

  initializer (picklable, no arguments) runs once in each worker process (not for threads or
  in this process)."""
  if workers <= 1 or len(tasks) <= 1:
    yield from map(fn, tasks)
    return
  if main_is_importable():
    with process_pool(workers, initializer=initializer) as pool:
      yield from pool.map(fn, tasks, chunksize=chunksize)
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      yield from pool.map(fn, tasks)
