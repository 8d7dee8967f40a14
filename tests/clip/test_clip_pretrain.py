"""The tiny CLIP's contrastive pretraining (ssr_jax.clip.pretrain) resumes exactly: a run killed
after a checkpoint and rerun ends with the weights of an uninterrupted run, bit for bit."""

import jax
import numpy as np
import pytest

from ssr_jax.clip import pretrain
from ssr_jax.clip.model import CLIP
from ssr_jax.testing import TINY_TEXT_CLIP
from ssr_jax.train import resumable

CFG = TINY_TEXT_CLIP  # A 2x2 patch grid: even, as the mosaic term needs.


class _Killed(Exception):
  pass


def test_pretrain_clip_resumes_exactly(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
  captions = [f"a photo of a {w}." for w in ("boat", "horse", "car") * 4]
  run = dict(steps=4, batch_size=5, lr=1e-3, seed=0, normalization="clip", settings=dict(steps=4))
  assert pretrain.num_mosaics(5) == 1  # The mosaic term's state is covered too.
  model = CLIP(CFG)
  straight, info = pretrain.pretrain_clip(
    model, images, captions, workdir=tmp_path / "a", save_every=2, **run
  )
  assert info["steps_run"] == 4 and np.isfinite(info["final_loss"])

  save = resumable.Resumable.save

  def dies_after_2(self, step, state, loss):
    save(self, step, state, loss)
    if step == 2:
      self.close()
      raise _Killed

  monkeypatch.setattr(resumable.Resumable, "save", dies_after_2)
  with pytest.raises(_Killed):
    pretrain.pretrain_clip(model, images, captions, workdir=tmp_path / "b", save_every=2, **run)
  monkeypatch.setattr(resumable.Resumable, "save", save)
  assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["2"]
  resumed, info = pretrain.pretrain_clip(
    model, images, captions, workdir=tmp_path / "b", save_every=2, **run
  )
  assert info["steps_run"] == 2
  for (path, a), (_, b) in zip(
    jax.tree_util.tree_leaves_with_path(straight), jax.tree_util.tree_leaves_with_path(resumed)
  ):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
  with pytest.raises(ValueError, match="tiny CLIP pretraining with other steps"):
    other = run | dict(settings=dict(steps=5))
    pretrain.pretrain_clip(model, images, captions, workdir=tmp_path / "b", save_every=2, **other)
