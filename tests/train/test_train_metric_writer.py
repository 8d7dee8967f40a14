"""MetricWriter's files after a resume; the interval summary and the console line."""

import json

import numpy as np
import pytest

from ssr_jax.train.metric_writer import MetricWriter, console_line, format_duration, summarize


def test_metric_writer_drops_records_after_resume_step(tmp_path):
  w = MetricWriter(tmp_path)
  for step in (2, 4, 6):
    w.write_scalars(step, {"loss": step / 10})
  w.write_scalars(4, {"miou": 0.5}, kind="eval")
  w.write_scalars(6, {"miou": float("nan")}, kind="eval")
  w.close()
  w = MetricWriter(tmp_path, resume_step=4)
  w.write_scalars(6, {"loss": 0.7})
  with pytest.raises(ValueError, match="uint8"):
    w.write_images(6, {"x": np.zeros((4, 4, 3), np.float32)})
  w.close()
  train_steps = [
    json.loads(x) for x in (tmp_path / "train_metrics.jsonl").read_text().split("\n") if x
  ]
  assert [(r["step"], r["loss"]) for r in train_steps] == [(2, 0.2), (4, 0.4), (6, 0.7)]
  assert (tmp_path / "eval_metrics.jsonl").read_text().count("\n") == 1


def test_format_duration():
  assert format_duration(0) == "0h00m00s"
  assert format_duration(3723.9) == "1h02m03s"
  assert format_duration(float("nan")) == "?" and format_duration(float("inf")) == "?"


def test_summarize_means_the_interval_and_keeps_the_last_lr():
  steps = [
    {"loss": 1.0, "lr": 0.3, "finite/loss": True},
    {"loss": 2.0, "lr": 0.2, "finite/loss": True},
    {"loss": 6.0, "lr": 0.1, "finite/loss": False},
  ]
  assert summarize(steps, skip_prefix="finite/") == {"loss": 3.0, "lr": 0.1}


def test_console_line():
  scalars = {"loss": 1.5, "mse": 1.0, "aux": 0.5, "lr": 1e-3, "grad_norm": 2.0, "param_norm": 9.0}
  line = console_line(10, 100, scalars, 2.0, 8)
  assert line == (
    "step 10/100 | loss 1.5000 | mse 1.0000 aux 0.5000 | lr 1.000e-03 | grad_norm 2.000 | "
    "2.00 steps/s 16.0 img/s | ETA 0h00m45s"
  )
  assert console_line(10, 100, scalars, float("nan"), 8).endswith("nan steps/s nan img/s | ETA ?")
