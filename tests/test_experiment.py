"""--mode ablation's rows and its table / JSON (training and evaluation stubbed: the rows' configs
and the file layout are what is checked here; a real run is in the README)."""

import dataclasses
import functools
import json

import numpy as np
import pytest

from configs import demo, voc
from ssr_jax import ablation as ablation_lib
from ssr_jax import experiment
from ssr_jax.clip.model import CLIP
from ssr_jax.config_check import ConfigError
from ssr_jax.model.ssr import build_task
from ssr_jax.testing import TINY_CLIP, TINY_DINO, random_dino


def _variant_c():
  """The demo config with our [v1] SGC variant C and CLIP attention alone: none of the rows."""
  config = demo.get_config()
  config.model.sgc.grouping = "superpixels"
  config.model.sgc.soft_alpha = 0.5
  config.model.cam.dino_weight = 0.0
  return config


def test_the_demo_is_the_ssr_row_itself():
  rows = [key for key, _, _ in experiment.ablation_rows(demo.get_config())]
  assert rows == [key for key, _, _ in experiment.VARIANTS]


def test_ablation_rows_are_the_papers_ladder_plus_a_config_of_its_own():
  plan = experiment.ablation_rows(_variant_c())
  rows = {key: cfg for key, _, cfg in plan}
  assert list(rows) == [key for key, _, _ in experiment.VARIANTS] + ["configured"]
  base, cmpa, dino = rows["baseline"], rows["cmpa"], rows["cmpa_dino"]
  ssr = rows["ssr"]
  assert base.model.cam.source == "clip" and not base.model.cmpa.enabled
  assert not base.model.sgc.enabled and base.model.cam.dino_weight == 0.0
  assert cmpa.model.cam.source == "cmpa" and cmpa.model.cmpa.enabled and not cmpa.model.sgc.enabled
  assert dino.model.cam.dino_weight == 0.6 and not dino.model.sgc.enabled
  assert ssr.model.sgc.grouping == "clusters" and ssr.model.sgc.soft_alpha == 1.0
  assert ssr.model.cam.dino_weight == 0.6 and ssr.model.cmpa.enabled
  own = rows["configured"]  # [v1] SGC variant C.
  assert own.model.sgc.grouping == "superpixels" and own.model.sgc.soft_alpha == 0.5
  for cfg in rows.values():  # Same seeds and schedule everywhere.
    assert cfg.seed == 0 and cfg.train.num_steps == 250
  # Every component of the verdicts names rows that exist.
  for c in ablation_lib.COMPONENTS:
    assert c.better[0] in rows and c.worse[0] in rows


def test_voc_is_the_ssr_row_itself():
  rows = [key for key, _, _ in experiment.ablation_rows(voc.get_config())]
  assert rows == [key for key, _, _ in experiment.VARIANTS]


def test_ablation_rows_and_seeds_are_checked_before_any_work(tmp_path):
  config = demo.get_config()
  config.ablation.rows = ("baseline", "ssr")
  assert [k for k, _, _ in experiment.ablation_rows(config)] == ["baseline", "ssr"]
  config.ablation.rows = ("basline",)
  with pytest.raises(experiment.UserError, match=r"ablation\.rows=.*unknown \['basline'\]"):
    experiment.ablation_rows(config)
  config.ablation.num_seeds = 0
  with pytest.raises(experiment.UserError, match=r"ablation\.num_seeds=0"):
    experiment.ablation_seeds(config)
  with pytest.raises(ConfigError, match=r"ablation\.num_seeds=0"):
    experiment.run("ablation", config, str(tmp_path))
  assert not (tmp_path / "data").exists()  # Stopped before the demo's data.
  config.ablation.num_seeds = 3
  config.seed = 5
  assert experiment.ablation_seeds(config) == [5, 6, 7]


def test_a_bad_world_dial_stops_the_demo_naming_the_field(tmp_path):
  config = demo.get_config()
  config.data.synthetic.rider_on_horse = 1.5
  with pytest.raises(ConfigError, match=r"data\.synthetic\.rider_on_horse=1\.5"):
    experiment.run("train", config, str(tmp_path))
  assert not (tmp_path / "data").exists()  # Stopped before generating anything.


def _fake_result(key, seed, targets, splits):
  """A deterministic stand-in result of one row and seed: mIoU = row offset + seed noise."""
  offset = {"baseline": 0.40, "cmpa": 0.45, "cmpa_dino": 0.46, "sgc": 0.41, "ssr": 0.50}
  noise = {0: 0.0, 1: 0.01, 2: -0.004}[seed]
  base = offset.get(key, 0.3) + noise
  return {
    s: {
      t: {"miou": base + 0.01 * i, "precision": 0.7, "recall": 0.8 + noise, "confusion_ratio": None}
      for i, t in enumerate(targets)
    }
    for s in splits
  }


def test_ablation_over_seeds_writes_per_seed_values_summaries_and_verdicts(tmp_path, monkeypatch):
  config = _variant_c()
  trained = []

  def fake_train(cfg, workdir):
    trained.append((workdir, cfg.seed))

  def fake_evaluate(cfg, workdir):
    key = workdir.split("/ablation/")[1].split("/")[0]
    return _fake_result(key, cfg.seed, cfg.eval.targets, cfg.eval.splits)

  monkeypatch.setattr(experiment, "train", fake_train)
  monkeypatch.setattr(experiment, "evaluate", fake_evaluate)
  experiment.ablation(config, str(tmp_path))
  keys = [k for k, _, _ in experiment.VARIANTS] + ["configured"]
  assert sorted(trained) == sorted(
    (str(tmp_path / "ablation" / k / f"seed_{s}"), s) for k in keys for s in (0, 1, 2)
  )
  out = json.loads((tmp_path / "ablation.json").read_text())
  assert out["seeds"] == [0, 1, 2] and [r["key"] for r in out["rows"]] == keys
  targets, splits = config.eval.targets, config.eval.splits
  for r in out["rows"]:
    for s in (0, 1, 2):
      assert r["per_seed"][str(s)] == _fake_result(r["key"], s, targets, splits)
    got = r["summary"]["val"]["seg"]["miou"]
    values = [_fake_result(r["key"], s, targets, splits)["val"]["seg"]["miou"] for s in (0, 1, 2)]
    assert got["mean"] == pytest.approx(np.mean(values))
    assert got["std"] == pytest.approx(np.std(values, ddof=1)) and got["n"] == 3
    assert r["summary"]["train"]["cam"]["confusion_ratio"] == {"mean": None, "std": None, "n": 0}
  verdicts = {(v["component"], v["split"]): v for v in out["components"]}
  # Constant offsets between rows: zero spread of the paired differences, so any gain counts.
  cmpa = verdicts[("CMPA: initial CAM (Table 4)", "train")]
  assert cmpa["effect"] == pytest.approx(0.05) and cmpa["std"] == pytest.approx(0, abs=1e-12)
  assert cmpa["exceeds"] is True
  table = (tmp_path / "ablation.md").read_text()
  assert "| SSR (CMPA + SGC) | train |" in table and "| as configured | val |" in table
  assert (
    "| CMPA: initial CAM (Table 4) | 58.6 -> 63.3 | train | +0.050 ± 0.000 | **yes** |" in table
  )
  assert "0.402 ± 0.007" in table  # baseline clip_cam on val: 0.40 + (0, .01, -.004).

  # A rerun reuses the finished runs of the same configs; a changed config reruns them.
  trained.clear()
  experiment.ablation(config, str(tmp_path))
  assert trained == []
  config.train.num_steps = 10
  config.ablation.rows = ("baseline",)
  config.ablation.num_seeds = 1
  experiment.ablation(config, str(tmp_path))
  assert trained == [(str(tmp_path / "ablation" / "baseline" / "seed_0"), 0)]


def test_the_papers_affinity_without_dino_weights_stops_at_start_up_naming_the_flag():
  config = voc.get_config()
  config.model.cam.num_attn_layers = config.model.cam.rfm_layers = 2  # The tiny CLIP's depth.
  clip = CLIP(TINY_CLIP)
  build = functools.partial(build_task, config.model, config.loss, clip=clip, num_classes=21)
  with pytest.raises(ValueError, match=r"--config\.dino\.weights=.*dino_weight=0"):
    build()
  config.model.cam.dino_weight = 0.0  # CLIP attention alone: no DINO needed.
  assert build().dino is None
  config.model.cam.dino_weight = 0.6
  wrong_patch, _ = random_dino(dataclasses.replace(TINY_DINO, patch_size=16))
  with pytest.raises(ValueError, match="patch size 16 differs from CLIP's 8"):
    build_task(config.model, config.loss, clip=clip, num_classes=21, dino=wrong_patch)
