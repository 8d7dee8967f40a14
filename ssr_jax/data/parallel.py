"""Order-preserving parallel map for the offline data tools (COCO conversion, superpixels).

Worker processes are spawned, not forked: callers (training, the demo, tests) have usually
imported JAX, whose threads make fork() unsafe. Spawned workers re-import the main module, so
when it has no file (python -c, stdin, notebooks) threads are used instead. workers <= 1 runs
in this process.
"""

import concurrent.futures
import multiprocessing
import os
import sys


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


def imap(fn, tasks, *, workers: int, chunksize: int = 16, initializer=None):
  """Yields fn(task) for each task, in order; fn and tasks must be picklable if workers > 1.

  initializer (picklable, no arguments) runs once in each worker process (not for threads or
  in this process)."""
  if workers <= 1 or len(tasks) <= 1:
    yield from map(fn, tasks)
    return
  if main_is_importable():
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer)
    with pool:
      yield from pool.map(fn, tasks, chunksize=chunksize)
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      yield from pool.map(fn, tasks)
