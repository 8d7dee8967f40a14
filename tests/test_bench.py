"""The GPU rehearsal and eval benchmarks run end to end at small sizes (figures not asserted)."""

from ssr_jax.bench import __main__ as bench


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
