"""The callers' superpixel decision: `pseudo` eval with SGC on reads the split's superpixels."""

import pytest

from configs import base
from ssr_jax.data import superpixels, synthetic
from ssr_jax.data.files import DataError
from ssr_jax.eval import loop as eval_loop
from tests.data.conftest import synthetic_config


def test_eval_of_pseudo_with_sgc_needs_val_superpixels(tmp_path):
  # Before, this ran on all-zero superpixel maps, i.e. silently without SGC.
  root = tmp_path / "data"
  synthetic.write_dataset(str(root), num_train=2, num_val=2, size=32, seed=0)
  config = base.get_config()
  with config.unlocked():
    config.data = synthetic_config(root, crop_size=32)
  assert config.model.sgc.enabled
  with pytest.raises(DataError) as e:
    # The check comes before the model is touched, so no task is needed.
    eval_loop.evaluate(
      config,
      str(tmp_path / "work"),
      task=None,
      frozen=None,
      params=None,
      step=0,
      target="pseudo",
      split="val",
    )
  msg = str(e.value)
  assert f"superpixel folder {root / 'Superpixels_skimage_100'} does not exist" in msg
  assert superpixels.command(config.data, "val") in msg
