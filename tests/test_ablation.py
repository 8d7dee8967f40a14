"""ssr_jax.ablation: summaries over seeds and the per-component verdicts, against numpy and hand
computations."""

import numpy as np
import pytest

from ssr_jax import ablation


def test_mean_std_is_numpys_sample_statistics_over_defined_values():
  assert ablation.mean_std([0.5, None, 0.7, 0.9]) == pytest.approx(
    dict(mean=0.7, std=np.std([0.5, 0.7, 0.9], ddof=1), n=3)
  )
  assert ablation.mean_std([0.4]) == dict(mean=0.4, std=0.0, n=1)
  assert ablation.mean_std([None, None]) == dict(mean=None, std=None, n=0)


def test_summarize_over_seeds():
  per_seed = {
    s: {"val": {"seg": {"miou": m, "recall": r}}}
    for s, m, r in ((0, 0.5, 0.7), (1, 0.6, None), (3, 0.8, 0.9))
  }
  got = ablation.summarize(per_seed)["val"]["seg"]
  assert got["miou"] == pytest.approx(dict(mean=19 / 30, std=np.std([0.5, 0.6, 0.8], ddof=1), n=3))
  assert got["recall"] == pytest.approx(dict(mean=0.8, std=np.std([0.7, 0.9], ddof=1), n=2))


def test_paired_effect_verdicts_by_hand():
  # d = (0.10, 0.12, 0.08): mean 0.10, sd 0.02 -> 0.10 > 0.04: exceeds.
  v = ablation.paired_effect([0.6, 0.62, 0.58], [0.5, 0.5, 0.5])
  assert v["effect"] == pytest.approx(0.1) and v["std"] == pytest.approx(0.02)
  assert v["exceeds"] is True and v["n"] == 3
  # d = (0.05, -0.01, 0.02): mean 0.02, sd 0.03 -> within the noise.
  assert ablation.paired_effect([0.55, 0.49, 0.52], [0.5, 0.5, 0.5])["exceeds"] is False
  # A large effect in the other direction is not the paper's.
  assert ablation.paired_effect([0.3, 0.31, 0.3], [0.5, 0.5, 0.5])["exceeds"] is False
  # Pairing matters: the rows move together with the seed, their difference does not.
  v = ablation.paired_effect([0.40, 0.60, 0.50], [0.38, 0.58, 0.48])
  assert v["exceeds"] is True and v["std"] == pytest.approx(0, abs=1e-12)
  assert ablation.paired_effect([0.6], [0.5])["exceeds"] is None  # One seed: no spread.


def test_verdicts_pair_the_components_cells_by_seed():
  def run(cam, pseudo):
    return {"train": {"cam": {"miou": cam}, "pseudo": {"miou": pseudo}}}

  rows = [
    dict(key="baseline", per_seed={0: run(0.40, 0.5), 1: run(0.40, 0.5)}),
    dict(key="cmpa", per_seed={0: run(0.45, 0.6), 1: run(0.47, 0.5)}),
  ]
  got = {v["component"]: v for v in ablation.verdicts(rows)}
  assert set(got) == {"CMPA: initial CAM (Table 4)", "+ CLIP attention (Table 3)"}
  cam = got["CMPA: initial CAM (Table 4)"]  # d = (0.05, 0.07)
  assert cam["effect"] == pytest.approx(0.06) and cam["std"] == pytest.approx(np.sqrt(2e-4))
  assert cam["exceeds"] is True and cam["split"] == "train"
  attn = got["+ CLIP attention (Table 3)"]  # d = (0.15, 0.03): mean 0.09, sd 0.085.
  assert attn["effect"] == pytest.approx(0.09) and attn["exceeds"] is False


def test_markdown_shows_the_spread_only_with_several_seeds():
  def row(values):
    per_seed = {s: {"val": {"seg": {m: v for m in ablation.METRICS}}} for s, v in values.items()}
    return dict(variant="r", summary=ablation.summarize(per_seed), seconds={0: 10.0})

  three = ablation.markdown([row({0: 0.5, 1: 0.6, 2: 0.7})], [], title="t")
  assert "| r | val | 0.600 ± 0.100 | 10 |" in three
  one = ablation.markdown([row({0: 0.5})], [], title="t")
  assert "| r | val | 0.500 | 10 |" in one
