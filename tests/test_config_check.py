"""Start-up config validation (ssr_jax/config_check.py): every impossible value, one line each,
all at once; launch.py prints them and exits 2 before anything is generated, loaded or written."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import base
from ssr_jax import config_check
from ssr_jax.config_check import ConfigError, check_config, problems

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("base", "voc", "coco", "demo")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_are_valid(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert problems(config, num_devices=1) == []
  check_config(config, num_devices=config.train.batch_size)  # One example per device.


def test_every_rule_names_a_declared_field():
  config = base.get_config()
  for key in config_check.RULES:
    node = config
    for part in key.split("."):
      assert part in node, key
      node = node[part]
    assert not hasattr(node, "items"), f"{key} is a section, not a field"


# (key, impossible value, the expected line without "key=value: ").
BAD = [
  ("train.learning_rate", -1e-3, "must be > 0"),
  ("train.heads.learning_rate", 0.0, "must be > 0"),
  ("train.num_steps", 0, "must be > 0"),
  ("train.warmup_ratio", 1.5, "must be in [0, 1]"),
  ("train.b2", 1.0, "must be in [0, 1)"),
  ("train.keep_checkpoints", 0, "must be >= 1"),
  ("train.schedule", "linear", "use one of ('poly', 'cosine')"),
  ("model.cam.box_threshold", 1.2, "must be in [0, 1]"),
  ("model.sgc.ratio_threshold", -0.1, "must be in [0, 1]"),
  ("model.decoder.dropout", 1.0, "must be in [0, 1)"),
  ("model.cmpa.temperature", 0.0, "must be > 0"),
  ("model.cam.par_dilations", (1, 0), "must be a non-empty tuple, each entry >= 1"),
  ("loss.aff_weight", -0.01, "must be >= 0"),
  ("data.crop_size", 0, "must be > 0"),
  ("data.scale_range", (2.0, 0.5), "must be (low, high) with 0 < low <= high"),
  ("data.verify", "all", "use one of ('none', 'headers', 'full')"),
  ("eval.targets", ("seg", "crf"), "must be a non-empty subset of ('seg', 'cam', 'clip_cam', "),
  ("eval.scales", (1.0, -0.5), "must be a non-empty tuple, each entry > 0"),
]


def _set(config, key, value):
  *path, leaf = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[leaf] = value


def test_each_impossible_value_gets_its_own_line_all_at_once():
  config = base.get_config()
  for key, value, _ in BAD:
    _set(config, key, value)
  found = problems(config, num_devices=1)
  assert len(found) == len(BAD), "\n".join(found)
  for key, value, text in BAD:
    (line,) = [p for p in found if p.startswith(f"{key}=")]
    assert line.startswith(f"{key}={value!r}: {text}")
  with pytest.raises(ConfigError) as e:
    check_config(config, num_devices=1)
  assert e.value.problems == found and str(e.value) == "\n".join(found)


def test_cross_field_problems():
  config = base.get_config()
  config.train.batch_size = 12
  config.data.ignore_label = 3
  config.model.decoder.embed_dim = 100  # 8 heads.
  config.train.num_processes, config.train.process_id = 2, 2
  assert problems(config, num_devices=8) == [
    "train.batch_size=12: must be a multiple of the number of devices (8), e.g. 8",
    "train.process_id=2: must be < train.num_processes (2)",
    "data.ignore_label=3: must not be a class index (< data.num_classes=21)",
    "model.decoder.embed_dim=100: must be a multiple of model.decoder.num_heads (8)",
  ]
  # Where nothing trains (eval on another machine) the device count is not checked.
  assert not any("batch_size" in p for p in problems(config, num_devices=None))


def _launch(workdir, *overrides):
  return subprocess.run(
    [sys.executable, "launch.py", "--config", "configs/demo.py", "--workdir", str(workdir)]
    + list(overrides),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
  )


def test_launch_prints_one_line_per_problem_and_exits_2_before_any_work(tmp_path):
  workdir = tmp_path / "run"
  r = _launch(
    workdir,
    "--config.train.learning_rate=-0.001",
    "--config.train.batch_size=12",
    "--config.train.num_steps=0",
    "--config.model.cam.box_threshold=1.5",
  )
  assert r.returncode == 2, r.stderr
  assert r.stderr.splitlines() == [
    "error: model.cam.box_threshold=1.5: must be in [0, 1]",
    "error: train.num_steps=0: must be > 0",
    "error: train.learning_rate=-0.001: must be > 0",
    "error: train.batch_size=12: must be a multiple of the number of devices (8), e.g. 8",
  ]
  assert not workdir.exists()  # Not even the workdir: nothing generated, loaded or written.
