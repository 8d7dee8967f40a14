"""Helpers shared by the benchmarks: device facts, timing, memory, FLOPs, table printing."""

import importlib.metadata
import os
import platform
import statistics
import time

import jax

# Dense bf16 tensor-core peak per chip (NVIDIA datasheets, SXM parts); H200 has H100's compute.
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def device_info() -> dict:
  """Backend, device kind/count and library versions (for every benchmark record)."""
  import flax

  dev = jax.devices()[0]
  return dict(
    backend=jax.default_backend(),
    device_kind=dev.device_kind,
    device_count=jax.device_count(),
    jax=jax.__version__,
    jaxlib=importlib.metadata.version("jaxlib"),
    flax=flax.__version__,
    cpu_count=os.cpu_count(),
    python=platform.python_version(),
  )


def _block(x):
  return jax.block_until_ready(x)


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> dict:
  """Times fn(*args) (waiting for results). The first call's time is reported as compile_s
  (compilation plus one run); then warmup - 1 untimed calls and iters timed calls.
  """
  t0 = time.perf_counter()
  _block(fn(*args))
  compile_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    _block(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    _block(fn(*args))
    times.append(time.perf_counter() - t0)
  return dict(
    compile_s=compile_s,
    median_s=statistics.median(times),
    mean_s=statistics.fmean(times),
    min_s=min(times),
    max_s=max(times),
    iters=iters,
  )


def time_interleaved(fns: dict, *, warmup: int = 2, iters: int = 10) -> dict:
  """Times several (fn, args) pairs with their timed calls interleaved round-robin.

  On a shared or throttling machine the contenders then see the same conditions, so their
  ratio is fairer than from back-to-back time_fn runs. fns: {name: (fn, args tuple)}.
  Returns {name: time_fn-style dict}.
  """
  compile_s = {}
  for name, (fn, args) in fns.items():
    t0 = time.perf_counter()
    _block(fn(*args))
    compile_s[name] = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
      _block(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(iters):
    for name, (fn, args) in fns.items():
      t0 = time.perf_counter()
      _block(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {
    name: dict(
      compile_s=compile_s[name],
      median_s=statistics.median(ts),
      mean_s=statistics.fmean(ts),
      min_s=min(ts),
      max_s=max(ts),
      iters=iters,
    )
    for name, ts in times.items()
  }


def peak_memory_bytes(device=None) -> int | None:
  """Peak bytes in use on device (default: the first), or None where the backend has no stats."""
  stats = (device or jax.devices()[0]).memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def flops_of(jitted, *args) -> float | None:
  """FLOPs of one call of a jitted function (XLA cost analysis; args may be ShapeDtypeStructs).

  Analyses the lowered, pre-optimisation HLO: after GPU compilation matmuls become cuBLAS custom
  calls that the analysis does not count (it reported ~1.5 of ViT-B/16's 35 GFLOP on an H200).
  """
  lowered = jitted.lower(*args)
  cost = lowered.cost_analysis()
  if not cost:
    cost = lowered.compile().cost_analysis()
  if isinstance(cost, list | tuple):  # Older jax returned one dict per computation.
    cost = cost[0] if cost else None
  flops = cost.get("flops") if cost else None
  return float(flops) if flops and flops > 0 else None


def peak_flops(device=None) -> float | None:
  """Dense bf16 peak FLOP/s of one device (H100/H200), else None (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in kind), None)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out |= _flatten(v, key + ".")
    else:
      out[key] = v
  return out


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def print_table(d: dict, title: str | None = None):
  """Prints a (nested) dict as a two-column key/value table."""
  rows = [(k, _fmt(v)) for k, v in _flatten(d).items()]
  width = max((len(k) for k, _ in rows), default=0)
  if title:
    print(title)
  for k, v in rows:
    print(f"  {k:<{width}}  {v}")
