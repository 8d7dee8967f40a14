"""Benchmark plumbing: the dispatcher, FLOP counting and timing helpers."""

import json

import jax
import jax.numpy as jnp

from ssr_jax.bench import __main__ as bench_main
from ssr_jax.bench import common


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
  assert "clip.32px.ours_img_s" in capsys.readouterr().out
  assert not bench_main._available("no_such_bench")
