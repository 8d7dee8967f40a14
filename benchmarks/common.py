"""Helpers shared by the benchmarks: machine facts, flags, the random setup, timing, memory,
FLOPs, table printing."""

import importlib.metadata
import platform
import statistics
import time

import flax
import jax

from configs import voc
from ssr_jax import machine, testing
from ssr_jax.clip.model import CONFIGS
from ssr_jax.dino.model import CONFIGS as DINO_CONFIGS

# Dense bf16 tensor-core peak per chip (NVIDIA datasheets, SXM parts); H200 has H100's compute.
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def device_info() -> dict:
  """The machine (cpu_info), JAX backend, device kind/count and library versions (for every
  benchmark record)."""
  dev = jax.devices()[0]
  return machine.cpu_info() | dict(
    backend=jax.default_backend(),
    device_kind=dev.device_kind,
    device_count=jax.device_count(),
    jax=jax.__version__,
    jaxlib=importlib.metadata.version("jaxlib"),
    flax=flax.__version__,
    python=platform.python_version(),
  )


def machine_line(info: dict | None = None) -> str:
  """One line naming the machine, from device_info() (or a dict like it), e.g.
  'cpu: Intel(R) Xeon(R) Platinum 8480+ | avx avx2 avx512f avx512_bf16 amx_bf16 | 224 cpus, 112
  cores, 16 usable | jax gpu: NVIDIA H200 x1'.
  """
  i = device_info() if info is None else info
  dev = f"jax {i['backend']}: {i['device_kind']} x{i['device_count']}"
  return f"{machine.cpu_line(i)} | {dev}"


def add_model_args(p, *, batch: int = 4, crop: int | None = 320, dtype: str = "bfloat16"):
  """--batch, --crop (unless crop is None) and --dtype, with these defaults."""
  p.add_argument("--batch", type=int, default=batch)
  if crop is not None:
    p.add_argument("--crop", type=int, default=crop)
  p.add_argument("--dtype", default=dtype, choices=("float32", "bfloat16"))


def bench_config(args):
  """VOC config sized by the benchmark flags (--small: 64 px, fewer CAM layers and PAR steps)."""
  c = voc.get_config()
  c.model.dtype = args.dtype
  c.train.batch_size = args.batch
  c.data.crop_size = 64 if args.small else args.crop
  if args.small:
    c.model.cam.num_attn_layers = 3
    c.model.cam.rfm_layers = 3
    c.model.cam.par_iters = 2
  return c


def random_setup(config, *, small: bool, seed: int = 0):
  """(task, frozen, batch): random ViT-B/16 and DINO ViT-S/16 (small: testing's tiny ones)
  weights and text embeddings, and a VOC-like batch (2-3 classes per image, 32x32-pixel block
  superpixels and colour regions)."""
  task, frozen = testing.random_build(
    config,
    clip_cfg=None if small else CONFIGS["ViT-B/16"],
    dino_cfg=None if small else DINO_CONFIGS["ViT-S/16"],
    seed=seed,
  )
  batch = testing.fake_batch(
    config.train.batch_size, config.data.crop_size, config.data.num_classes - 1, seed=seed
  )
  return task, frozen, batch


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
  if isinstance(v, list | tuple):
    return " ".join(_fmt(x) for x in v)
  return str(v)


def print_table(d: dict, title: str | None = None):
  """Prints a (nested) dict as a two-column key/value table."""
  rows = [(k, _fmt(v)) for k, v in _flatten(d).items()]
  width = max((len(k) for k, _ in rows), default=0)
  if title:
    print(title)
  for k, v in rows:
    print(f"  {k:<{width}}  {v}")
