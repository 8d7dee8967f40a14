"""What machine a timing was taken on: CPU model, the ISA flags that decide XLA's CPU speed, and
core counts. Two 2-core machines ran the demo 2.6x apart (an AVX2-only AMD EPYC vs an AVX-512
Xeon), so every printed timing names its CPU (the demo's tiny-CLIP pretraining, `benchmarks`).
"""

import os
import platform
import re
import subprocess

# CPU features that decide how fast XLA's CPU backend runs matmuls and convolutions: x86 vector
# and matrix extensions (AMX and AVX-512 BF16 for bf16), then their Arm counterparts.
ISA_FLAGS = (
  "fma",
  "avx",
  "avx2",
  "avx512f",
  "avx512_vnni",
  "avx512_bf16",
  "avx512_fp16",
  "avx_vnni",
  "amx_tile",
  "amx_bf16",
  "amx_int8",
  "asimd",
  "sve",
  "sve2",
  "bf16",
  "i8mm",
)


def cpu_info(cpuinfo: str | None = None) -> dict:
  """CPU model, ISA_FLAGS present, logical/physical/usable CPU counts.

  cpuinfo: the text of /proc/cpuinfo (default: read it; absent off Linux). The model comes from
  its "model name" (x86), else lscpu's "Model name" (Arm's cpuinfo has none), else platform.
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  fields, cores, logical = {}, set(), 0
  for block in cpuinfo.split("\n\n"):
    kv = dict(
      (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines())
    )
    if "processor" in kv:
      logical += 1
    if "core id" in kv:
      cores.add((kv.get("physical id"), kv["core id"]))
    for k, v in kv.items():
      fields.setdefault(k, v)
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    usable = os.cpu_count()
  return dict(
    cpu_model=fields.get("model name") or _lscpu_model() or platform.processor() or "unknown",
    isa=[f for f in ISA_FLAGS if f in flags],
    logical_cpus=logical or os.cpu_count(),
    physical_cores=len(cores) or None,
    usable_cpus=usable,
  )


def _lscpu_model() -> str | None:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  m = re.search(r"^Model name:\s*(.+)$", out, re.M)
  return m.group(1).strip() if m else None


def cpu_line(info: dict | None = None) -> str:
  """One line from cpu_info() (or a dict like it), e.g.
  'cpu: Intel(R) Xeon(R) Processor | fma avx avx2 avx512f | 2 cpus, 2 cores'."""
  i = cpu_info() if info is None else info
  cpus = f"{i['logical_cpus']} cpus"
  if i.get("physical_cores"):
    cpus += f", {i['physical_cores']} cores"
  if i.get("usable_cpus") != i["logical_cpus"]:
    cpus += f", {i['usable_cpus']} usable"
  isa = " ".join(i["isa"]) or "no listed ISA extensions"
  return f"cpu: {i['cpu_model']} | {isa} | {cpus}"
