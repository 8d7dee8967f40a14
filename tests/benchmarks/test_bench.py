"""The GPU rehearsal and eval benchmarks run end to end at small sizes (figures not asserted)."""

from benchmarks import __main__ as bench


def test_rehearsal_small_trains_resumes_and_restores(tmp_path):
  out = bench.main(["rehearsal", "--small", "--batch", "8", "--workdir", str(tmp_path)])[
    "rehearsal"
  ]
  assert out["first_run_steps"] == 6
  assert out["resumed_to_step"] == out["restored_checkpoint_step"] == 8
  assert out["restore_ok"]


def test_eval_small_counts_every_image():
  out = bench.main(["eval", "--small", "--images", "11", "--batch", "8"])["eval"]
  assert out["images"] == 11 and out["images_per_s"] > 0
  assert out["timed_pass_compilations"] == 0


def _meta(pid, tid, kind, name):
  ev = {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}}
  return ev | ({"tid": tid} if tid is not None else {})


def test_profile_summary_attributes_kernels_to_named_scopes():
  from benchmarks import profile

  hlo = "\n".join(
    [
      "ENTRY %main {",
      '  %fusion.3 = f32[4] fusion(%p), kind=kLoop, calls=%c, metadata={op_type="add" '
      'op_name="jit(step)/jvp(par)/add" source_file="a.py"}',
      '  %cublas-gemm.1 = f32[4] custom-call(%p), metadata={op_name="jit(step)/transpose(jvp('
      'decoder))/dot_general"}',
      '  ROOT %copy.2 = f32[4] copy(%p), metadata={op_name="jit(step)/optimizer/mul"}',
      "}",
    ]
  )
  k = lambda tid, name, dur, **args: {  # noqa: E731
    "ph": "X",
    "pid": 2,
    "tid": tid,
    "name": name,
    "dur": dur,
    "ts": 0,
    "args": args,
  }
  trace = {
    "traceEvents": [
      _meta(1, None, "process_name", "/host:CPU"),
      _meta(2, None, "process_name", "/device:GPU:0"),
      _meta(2, 7, "thread_name", "Stream #7(Compute)"),
      _meta(2, 9, "thread_name", "XLA Ops"),
      k(7, "fusion_3", 3000.0),
      k(7, "fusion_3", 1000.0),  # Named after the instruction.
      k(7, "sm90_xmma_gemm_bf16", 500.0, hlo_op="cublas-gemm.1"),  # Matched through args.
      k(7, "copy_2", 250.0),
      k(7, "memcpy_unknown", 250.0),
      k(9, "fusion.3", 9999.0),  # An aggregate line: ignored.
      {"ph": "X", "pid": 1, "tid": 1, "name": "fusion_3", "dur": 8888.0, "ts": 0},  # Host.
    ]
  }
  out = profile.summarize(trace, hlo, steps=2)
  assert out["stages_ms_per_step"] == {
    "par": 2.0,
    "decoder": 0.25,
    "optimizer": 0.125,
    "unattributed": 0.125,
  }
  assert out["device_ms_per_step"] == 2.5 and out["kernels_per_step"] == 2.5
  assert out["stage_kernels_per_step"] == {
    "par": 1.0,
    "decoder": 0.5,
    "optimizer": 0.5,
    "unattributed": 0.5,
  }
  assert out["unattributed_kernels"] == 1
  assert out["top_kernels_ms_per_step"]["fusion_3 (x1)"] == 2.0


def test_stage_of_unwraps_transformations_and_takes_innermost():
  from benchmarks.profile import stage_of

  assert stage_of("jit(f)/transpose(jvp(decoder))/cmpa/dot") == "cmpa"
  assert stage_of("jit(f)/vmap(jvp(gradcam))/add") == "gradcam"
  assert stage_of("jit(f)/reduce_sum") == "other"
  assert stage_of("jit(f)/parity/add") == "other"  # Whole components only.
