"""--mode ablation's seed loop on the shortened demo: each row's per-seed results are those of a
single train_and_eval run with that seed."""

from configs import demo as demo_config
from ssr_jax import ablation, demo, experiment
from tests.test_demo_e2e import _tiny


def test_per_seed_results_equal_single_runs_with_those_seeds(tmp_path):
  config = _tiny(demo_config.get_config())
  config.data.source = "files"  # No TFDS build: the same numbers, less time.
  config.eval.targets = ("seg",)  # One evaluation per run: the test costs 4 short trainings.
  config.eval.splits = ("val",)
  config.eval.num_vis = 0
  config.train.checkpoint_every = 4  # One save per run.
  # The baseline row reads no DINO (dino_weight 0): name the shipped file instead of pretraining.
  config.dino.weights = str(demo.SHIPPED_DINO)
  config.ablation.rows = ("baseline",)
  config.ablation.num_seeds = 2
  config.seed = 3
  abl = tmp_path / "abl"
  (row,) = experiment.run("ablation", config, str(abl))
  assert sorted(row["per_seed"]) == [3, 4]
  assert row["per_seed"][3] != row["per_seed"][4]  # The seed reaches the training.
  _, _, single = experiment.ablation_rows(config)[0]
  # The ablation's data and tiny CLIP (pretrained in its workdir), so only the seed differs.
  single.data.root = str(abl / "data")
  single.clip.weights = str(abl / "clip" / "tiny_clip.npz")
  for seed in (3, 4):
    single.seed = seed
    res = experiment.run("train_and_eval", single, str(tmp_path / f"single_{seed}"))
    got = {
      s: {t: {m: r[m] for m in ablation.METRICS} for t, r in rs.items()} for s, rs in res.items()
    }
    assert row["per_seed"][seed] == got, seed
