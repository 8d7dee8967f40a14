"""--mode ablation's rows and its table / JSON (training and evaluation stubbed: the rows' configs
and the file layout are what is checked here; a real run is in the README)."""

import dataclasses
import functools
import json

import pytest

from configs import demo, voc
from ssr_jax import experiment
from ssr_jax.clip.model import CLIP
from ssr_jax.model.ssr import build_task
from ssr_jax.testing import TINY_CLIP, TINY_DINO, random_dino


def test_ablation_rows_are_the_papers_ladder_plus_the_demos_own_setting():
  rows = dict(experiment.ablation_rows(demo.get_config()))
  assert list(rows) == [name for name, _ in experiment.VARIANTS] + ["as configured"]
  base, cmpa, dino = rows["baseline (WeCLIP)"], rows["+CMPA"], rows["+CMPA +DINO attention"]
  ssr = rows["SSR (CMPA + SGC)"]
  assert base.model.cam.source == "clip" and not base.model.cmpa.enabled
  assert not base.model.sgc.enabled and base.model.cam.dino_weight == 0.0
  assert cmpa.model.cam.source == "cmpa" and cmpa.model.cmpa.enabled and not cmpa.model.sgc.enabled
  assert dino.model.cam.dino_weight == 0.6 and not dino.model.sgc.enabled
  assert ssr.model.sgc.grouping == "clusters" and ssr.model.sgc.soft_alpha == 1.0
  assert ssr.model.cam.dino_weight == 0.6 and ssr.model.cmpa.enabled
  own = rows["as configured"]  # The demo's [v1] SGC variant C.
  assert own.model.sgc.grouping == "superpixels" and own.model.sgc.soft_alpha == 0.5
  for cfg in rows.values():  # Same seeds and schedule everywhere.
    assert cfg.seed == 0 and cfg.train.num_steps == 250


def test_voc_is_the_ssr_row_itself():
  rows = [name for name, _ in experiment.ablation_rows(voc.get_config())]
  assert rows == [name for name, _ in experiment.VARIANTS]


def test_ablation_writes_one_entry_per_variant_and_split(tmp_path, monkeypatch, capsys):
  config = demo.get_config()
  seen = []
  monkeypatch.setattr(experiment, "train", lambda cfg, workdir: seen.append(workdir))

  def fake_evaluate(cfg, workdir):
    score = 0.1 * len(seen)
    return {s: {t: {"miou": score} for t in cfg.eval.targets} for s in cfg.eval.splits}

  monkeypatch.setattr(experiment, "evaluate", fake_evaluate)
  experiment.ablation(config, str(tmp_path))
  assert len(seen) == len(set(seen)) == len(experiment.VARIANTS) + 1  # One workdir per row.
  entries = json.loads((tmp_path / "ablation.json").read_text())
  assert [e["variant"] for e in entries][0] == "baseline (WeCLIP)"
  for i, e in enumerate(entries):
    assert set(e) == {"variant", "val", "train"}
    assert e["val"] == {t: 0.1 * (i + 1) for t in ("clip_cam", "cam", "pseudo", "seg")}
  table = (tmp_path / "ablation.md").read_text()
  assert "| SSR (CMPA + SGC) | train |" in table and "| as configured | val |" in table


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
