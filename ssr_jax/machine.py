"""What machine a timing was taken on: CPU model, the ISA flags that move XLA's CPU speed, cores.

Two 2-core machines ran the demo 2.6x apart (an AVX2-only AMD EPYC vs an AVX-512 Xeon), so every
printed timing names its CPU.
"""

import os
import platform

# The flags that change which XLA:CPU kernels run (vector width, bf16/int8 dot products).
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def _cpuinfo(path="/proc/cpuinfo") -> dict:
  """First processor's fields of a Linux /proc/cpuinfo ({} elsewhere)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return {}
  fields = {}
  for line in text.split("\n\n")[0].splitlines():
    key, sep, value = line.partition(":")
    if sep:
      fields[key.strip()] = value.strip()
  return fields


def describe(cpuinfo_path="/proc/cpuinfo") -> dict:
  """{"cpu": model name, "isa": [flags of ISA_FLAGS present], "cores": usable cores}."""
  info = _cpuinfo(cpuinfo_path)
  flags = set(info.get("flags", "").split())
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return dict(
    cpu=info.get("model name") or platform.processor() or platform.machine(),
    isa=[f for f in ISA_FLAGS if f in flags],
    cores=cores,
  )


def summary(cpuinfo_path="/proc/cpuinfo") -> str:
  """One line, e.g. 'Intel(R) Xeon(R) Processor (avx avx2 fma avx512f), 2 cores'."""
  d = describe(cpuinfo_path)
  return f"{d['cpu']} ({' '.join(d['isa']) or 'no AVX'}), {d['cores']} cores"
