"""PASCAL VOC 2012 + SBD (train_aug, 10,582 images; 21 classes). WeCLIP's VOC settings (§1)."""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = "voc"
  c.data.train_split = "train_aug"
  c.data.val_split = "val"
  # The numpy pipeline (used where TensorFlow is absent, as on our GPU host) needs processes to
  # feed the GPU step: on a 16-core H100 host 12 processes gave 692 img/s, 12 threads 301 (GIL),
  # and the bf16 step consumes 325 img/s.
  c.data.worker_type = "process"
  c.data.num_workers = 12
  c.data.num_classes = 21
  c.train.batch_size = 4
  c.train.num_steps = 30000
  c.model.max_classes = 6
  c.model.cam.rfm_layers = 6
  c.model.cam.rfm_switch_step = 9000  # Effective switch of WeCLIP's iter_num quirk (§1.4).
  c.model.cam.box_threshold = 0.4
  c.model.sgc.threshold = 0.4
  c.eval.scales = (1.0, 0.75)
  return c
