"""MS COCO 2014 (train 82,081 / val 40,137; 81 classes). WeCLIP's COCO settings (§1)."""

from configs import base
from ssr_jax.clip.prompts import COCO_BG, COCO_FG


def get_config():
  c = base.get_config()
  c.data.name = "coco"
  c.data.train_split = "train"
  c.data.num_classes = 81
  c.model.class_names = COCO_FG
  c.model.bg_names = COCO_BG
  c.model.max_classes = 20
  c.model.cam.rfm_layers = 10
  c.model.cam.rfm_switch_step = 10000  # Effective switch of WeCLIP's iter_num quirk (§1.4).
  c.model.cam.box_threshold = 0.7
  c.model.sgc.high_threshold = 0.7
  c.model.sgc.threshold = 0.7
  c.train.batch_size = 8  # WeCLIP+CEP reports 8 for COCO; the repo config says 4 (§1.1).
  c.train.num_steps = 80000
  c.train.checkpoint_every = 5000
  return c
