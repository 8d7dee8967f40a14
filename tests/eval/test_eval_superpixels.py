"""Eval's superpixel decision: `pseudo` with SGC on requires the split's superpixels ([v1]) or
colour clusters (the paper's SGC) (before, it ran on all-zero maps, i.e. silently without SGC);
`seg` needs none."""

import pytest

from ssr_jax.data import superpixels, synthetic
from ssr_jax.data.files import DataError
from ssr_jax.eval import run as eval_run
from ssr_jax.model.ssr import sgc_inputs
from tests.data.conftest import synthetic_config


def test_eval_of_pseudo_with_sgc_needs_val_superpixels(tmp_path):
  # Before, this ran on all-zero superpixel maps, i.e. silently without SGC.
  root = tmp_path / "data"
  synthetic.write_dataset(str(root), num_train=2, num_val=2, size=32, seed=0)
  data_cfg = synthetic_config(root, crop_size=32)
  for reads in (sgc_inputs(True, "superpixels"), sgc_inputs(True, "clusters")):
    with pytest.raises(DataError) as e:
      eval_run.eval_dataset(data_cfg, "val", target="pseudo", sgc=reads)
    msg = str(e.value)
    assert f"superpixel folder {root / 'Superpixels_skimage_100'} does not exist" in msg
    assert superpixels.command(data_cfg, "val") in msg
    dataset, names = eval_run.eval_dataset(data_cfg, "val", target="seg", sgc=reads)
    assert len(dataset) == 2 and names[0] == "background"
