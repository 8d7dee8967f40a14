"""Device time per model stage from a jax.profiler trace (`benchmarks train --profile DIR`).

The SSR loss labels its stages with jax.named_scope (clip, gradcam, affinity, box_masks, sgc,
refine, par, decoder, seg_aff_losses, cmpa; optimizer in the train step). XLA copies the scope
path into each HLO instruction's metadata op_name; the profiler's device events name the
instruction they ran (args.hlo_op, or the kernel name itself). Joining the two gives the
device time of each stage, summed over the traced steps.
"""

import collections
import glob
import gzip
import json
import os
import re

STAGES = (
  "clip",
  "gradcam",
  "affinity",
  "box_masks",
  "sgc",
  "refine",
  "par",
  "decoder",
  "seg_aff_losses",
  "cmpa",
  "optimizer",
)

_INSTR = re.compile(
  r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"", re.M
)


def op_names(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: metadata op_name} for every instruction of an HLO module text."""
  return {m.group(1): m.group(2) for m in _INSTR.finditer(hlo_text)}


def stage_of(op_name: str, stages=STAGES) -> str:
  """The innermost known stage in a scope path such as 'jit(f)/transpose(jvp(par))/par/add'.

  Scopes also appear wrapped by transformations ('jvp(decoder)'), so path components are
  matched after stripping 'fn(...)' wrappers. Unknown paths give 'other'.
  """
  found = "other"
  for part in op_name.split("/"):
    while True:
      m = re.fullmatch(r"[\w\-]+\((.*)\)", part)
      if not m:
        break
      part = m.group(1)
    if part in stages:
      found = part
  return found


def device_events(trace: dict) -> list[dict]:
  """Complete ('X') events of the device processes ('/device:...') of a perfetto trace dict.

  Threads whose name says they aggregate others ('XLA Ops', 'XLA Modules', 'Steps', 'Launch
  Stats'...) are dropped so that each kernel counts once; only stream threads remain where the
  trace has them.
  """
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids, threads = set(), {}
  for e in events:
    if e.get("ph") != "M":
      continue
    if e.get("name") == "process_name" and str(e["args"].get("name", "")).startswith("/device:"):
      pids.add(e["pid"])
    if e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = str(e["args"].get("name", ""))
  dev = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids]
  stream = {k for k, v in threads.items() if k[0] in pids and "stream" in v.lower()}
  if stream:
    dev = [e for e in dev if (e["pid"], e.get("tid")) in stream]
  return dev


def _lookup(event: dict, names: dict) -> str | None:
  args = event.get("args") or {}
  for key in (args.get("hlo_op"), event.get("name")):
    if not key:
      continue
    if key in names:
      return names[key]
    # Kernels are named after their instruction with '.' written as '_' ('fusion_3' for
    # 'fusion.3'); cuBLAS/cuDNN kernels only match through args.hlo_op.
    alt = re.sub(r"_(\d+)$", r".\1", key)
    if alt in names:
      return names[alt]
  return None


def summarize(trace: dict, hlo_text: str, *, steps: int, top: int = 15) -> dict:
  """Per-stage device milliseconds per step, and the top kernels, from one trace.

  trace: perfetto trace dict; hlo_text: the compiled module's text (`compiled.as_text()`);
  steps: how many steps the trace covers.
  """
  names = op_names(hlo_text)
  per_stage = collections.Counter()
  stage_counts = collections.Counter()
  per_kernel = collections.Counter()
  counts = collections.Counter()
  unmatched = 0
  for e in device_events(trace):
    dur_ms = float(e.get("dur", 0.0)) / 1e3  # Trace times are microseconds.
    op = _lookup(e, names)
    unmatched += op is None
    stage = stage_of(op) if op else "unattributed"
    per_stage[stage] += dur_ms
    stage_counts[stage] += 1
    per_kernel[e.get("name", "?")] += dur_ms
    counts[e.get("name", "?")] += 1
  total = sum(per_stage.values())
  return dict(
    device_ms_per_step=round(total / steps, 3),
    kernels_per_step=round(sum(counts.values()) / steps, 1),
    unattributed_kernels=unmatched,
    stages_ms_per_step={k: round(v / steps, 3) for k, v in per_stage.most_common()},
    # Many small kernels are what a latency-bound step pays for (launch gaps included).
    stage_kernels_per_step={
      k: round(stage_counts[k] / steps, 1) for k, _ in per_stage.most_common()
    },
    top_kernels_ms_per_step={
      f"{k} (x{counts[k] // steps})": round(v / steps, 3) for k, v in per_kernel.most_common(top)
    },
  )


def load_trace(trace_dir: str) -> dict:
  """The newest perfetto_trace.json.gz jax.profiler wrote under trace_dir."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    return json.load(f)
