"""Benchmark plumbing: the dispatcher, the machine line, FLOP counting and timing helpers."""

import argparse
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks import __main__ as bench_main
from benchmarks import common
from ssr_jax import machine


def test_flops_of_matmul():
  f = jax.jit(lambda a, b: a @ b)
  a = jax.ShapeDtypeStruct((32, 48), jnp.float32)
  b = jax.ShapeDtypeStruct((48, 16), jnp.float32)
  assert common.flops_of(f, a, b) == 2 * 32 * 48 * 16


def test_time_helpers():
  f = jax.jit(lambda x: x * 2)
  t = common.time_fn(f, jnp.ones(4), warmup=1, iters=3)
  assert t["iters"] == 3 and 0 < t["min_s"] <= t["median_s"] <= t["max_s"]
  both = common.time_interleaved({"a": (f, (jnp.ones(4),)), "b": (f, (jnp.ones(8),))}, iters=2)
  assert set(both) == {"a", "b"} and both["b"]["iters"] == 2


def test_clip_bench_small_runs(tmp_path, capsys):
  out = tmp_path / "r.json"
  res = bench_main.main(["clip", "--small", "--no-torch", "--iters", "1", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["clip"]["32px"]["ours_img_s"] > 0 and saved["device"]["backend"] == "cpu"
  assert res["clip"]["48px"]["gflop_per_img"] > 0
  printed = capsys.readouterr().out
  assert "clip.32px.ours_img_s" in printed
  # The machine comes first in the output and is in the JSON.
  assert printed.splitlines()[0] == saved["machine"] == common.machine_line()
  assert saved["device"]["cpu_model"] and saved["device"]["logical_cpus"] >= 1
  assert not bench_main._available("no_such_bench")


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs Linux /proc/cpuinfo")
def test_machine_line_matches_proc_cpuinfo():
  with open("/proc/cpuinfo") as f:
    text = f.read()
  # Parsed here independently: the first "model name", the first flags line, processor entries.
  model = re.search(r"^model name\s*:\s*(.*?)\s*$", text, re.M)
  flags = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
  flags = set(flags.group(1).split()) if flags else set()
  processors = len(re.findall(r"^processor\s*:", text, re.M))
  line = common.machine_line()
  cpu, isa, cpus, dev = line.split(" | ")
  if model:
    assert cpu == f"cpu: {model.group(1)}"
  for flag in ("avx", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "sve"):
    assert (flag in isa.split()) == (flag in flags), flag
  assert cpus.startswith(f"{processors} cpus")
  d = jax.devices()[0]
  assert dev == f"jax {jax.default_backend()}: {d.device_kind} x{jax.device_count()}"


def test_cpu_info_without_model_name_or_core_ids(monkeypatch):
  # An Arm /proc/cpuinfo: "Features", no "model name" (lscpu then names the part).
  arm = "processor\t: 0\nFeatures\t: fp asimd sve sve2 bf16 i8mm\n\nprocessor\t: 1\n"
  monkeypatch.setattr(machine, "_lscpu_model", lambda: "Neoverse-V2")
  info = machine.cpu_info(arm)
  assert info["cpu_model"] == "Neoverse-V2" and info["isa"] == [
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
  ]
  assert info["logical_cpus"] == 2 and info["physical_cores"] is None
  info |= dict(usable_cpus=1, backend="gpu", device_kind="NVIDIA GH200", device_count=1)
  assert common.machine_line(info) == (
    "cpu: Neoverse-V2 | asimd sve sve2 bf16 i8mm | 2 cpus, 1 usable | jax gpu: NVIDIA GH200 x1"
  )


def test_add_model_args():
  p = argparse.ArgumentParser()
  common.add_model_args(p, batch=8, crop=None, dtype="float32")
  assert vars(p.parse_args([])) == dict(batch=8, dtype="float32")
  p = argparse.ArgumentParser()
  common.add_model_args(p)
  assert vars(p.parse_args(["--crop", "64"])) == dict(batch=4, crop=64, dtype="bfloat16")
