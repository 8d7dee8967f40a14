"""A shortened embedded demo end to end: data -> tiny CLIP and tiny DINO -> train -> checkpoint ->
restore -> eval (cam, pseudo, seg), through the same entry point as `launch.py --config
configs/demo.py`."""

import json
import os

import numpy as np
from PIL import Image

from configs import demo as demo_config
from ssr_jax import experiment, predict


def _tiny(config):
  config.data.synthetic.num_train = 16
  config.data.synthetic.num_val = 6
  config.data.synthetic.image_size = 32
  config.data.crop_size = 32
  config.data.num_workers = 1
  config.demo.pretrain_clip = True  # The shipped tiny CLIP is checked in test_demo_assets.py.
  config.demo.clip_steps = 3
  config.demo.clip_images = 32
  config.demo.clip_batch_size = 8
  config.demo.clip_width = 32
  config.demo.clip_layers = 3
  config.demo.pretrain_dino = True  # The shipped tiny DINO is checked in test_demo_assets.py.
  config.demo.dino_steps = 2
  config.demo.dino_batch_size = 8
  config.demo.dino_width = 32
  config.demo.dino_layers = 1
  config.demo.dino_heads = 2
  config.model.cam.dino_layers = 1  # SGC fuses the tiny DINO's one layer.
  config.model.cam.num_attn_layers = 2
  config.model.cam.rfm_layers = 2
  config.model.cam.rfm_switch_step = 2
  config.model.cmpa.refresh_every = 2  # Heads' CAMs and a prototype refresh within 4 steps.
  config.model.cmpa.bank_size = 32
  config.model.cam.par_iters = 2
  config.model.decoder.embed_dim = 16
  config.model.decoder.num_heads = 2
  config.train.batch_size = 8  # Also divisible by the 8 simulated devices.
  config.train.num_steps = 4
  config.train.checkpoint_every = 2
  config.train.log_every = 2
  config.eval.batch_size = 8
  config.eval.num_vis = 2
  return config


def test_demo_train_checkpoint_restore_eval(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # A relative workdir, as users type it.
  config = _tiny(demo_config.get_config())
  results = experiment.run("train_and_eval", config, "runs/demo")
  assert set(results) == {"val", "train"}
  for per_split in results.values():
    assert set(per_split) == {"clip_cam", "cam", "pseudo", "seg"}
    for r in per_split.values():
      assert 0.0 <= r["miou"] <= 1.0
  # The heads' CAMs (trained from step 2) are not frozen CLIP's.
  assert results["train"]["cam"]["miou"] != results["train"]["clip_cam"]["miou"]
  # prepare() returned a new config.
  assert not config.data.root and not config.clip.weights and not config.dino.weights

  assert sorted(os.listdir("runs/demo/checkpoints")) == ["2", "4"]
  with open("runs/demo/train_metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert [r["step"] for r in logged] == [2, 4]
  assert all(np.isfinite(r["loss"]) and "proto" in r and "seg" in r for r in logged)

  with open("runs/demo/eval/metrics_val_seg.json") as f:
    m = json.load(f)
  assert m["checkpoint_step"] == 4 and m["num_images"] == 6
  assert 0.0 <= m["miou"] <= 1.0 and "background" in m["per_class_iou"]
  preds = sorted(os.listdir("runs/demo/eval/val_seg/pred"))
  assert len(preds) == 6
  pred = np.asarray(Image.open(f"runs/demo/eval/val_seg/pred/{preds[0]}"))
  assert pred.shape == (32, 32) and pred.max() < 7
  vis = sorted(os.listdir("runs/demo/eval/val_seg/vis"))
  assert len(vis) == 2
  assert np.asarray(Image.open(f"runs/demo/eval/val_seg/vis/{vis[0]}")).std() > 0

  # The predict tool restores the same checkpoint from its stored config.
  img = "runs/demo/data/JPEGImages/val_00000.png"
  with open("broken.jpg", "wb") as f:
    f.write(b"not an image")
  rc = predict.main(["--workdir", "runs/demo", "--images", img, "broken.jpg", "--out", "preds"])
  assert rc == 1  # One unreadable file -> non-zero exit, the other image still written.
  out = np.asarray(Image.open("preds/val_00000.png"))
  evaluated = np.asarray(Image.open("runs/demo/eval/val_seg/pred/val_00000.png"))
  np.testing.assert_array_equal(out, evaluated)  # Same checkpoint, same inference protocol.
  assert os.path.exists("preds/val_00000_overlay.png")
