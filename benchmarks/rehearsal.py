"""Full-size training rehearsal: the real train loop (input pipeline, sharded step, Orbax saves,
logging) with random ViT-B/16 weights on synthetic VOC-sized data, then a resume and a restore.

`python -m benchmarks rehearsal [--small] [--steps 200] [--device gpu]`. Reports end-to-end
steps/s (input included), the checkpoint/resume behaviour and the number of compilations. Needs
no TensorFlow (numpy pipeline) and no real weights or data.
"""

import os
import tempfile
import time

import jax

from benchmarks import common
from ssr_jax import experiment
from ssr_jax.data import superpixels, synthetic
from ssr_jax.eval import run as eval_run
from ssr_jax.train import loop


def add_args(p):
  common.add_model_args(p)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--workdir", default="", help="default: a temporary directory")


def run(args):
  config = common.bench_config(args)
  work = args.workdir or tempfile.mkdtemp(prefix="ssr_rehearsal_")
  root = os.path.join(work, "data")
  size = config.data.crop_size + config.data.crop_size // 2  # Larger than the crop, as VOC.
  steps = 6 if args.small else args.steps
  config.data.name = "synthetic"
  config.data.root = root
  config.data.train_split, config.data.val_split = "train", "val"
  config.data.num_classes = synthetic.SPEC.num_classes
  config.data.pipeline = "numpy"
  config.data.num_workers = min(8, os.cpu_count() or 1)
  config.model.class_names = synthetic.SPEC.class_names
  config.model.bg_names = synthetic.SPEC.bg_names
  config.model.max_classes = 3
  config.train.num_steps = steps
  config.train.checkpoint_every = max(steps // 2, 1)
  config.train.log_every = max(steps // 4, 1)
  config.model.cam.rfm_switch_step = steps // 2
  t0 = time.perf_counter()
  synthetic.write_dataset(root, num_train=args.images, num_val=8, size=size, seed=0)
  superpixels.precompute(config.data, "train", workers=os.cpu_count() or 1, progress=False)
  data_s = time.perf_counter() - t0

  task, frozen, _ = common.random_setup(config, small=args.small)

  make_iterator = experiment.batches(config)
  t0 = time.perf_counter()
  state = loop.train(config, work, task=task, frozen=frozen, make_iterator=make_iterator)
  first_s = time.perf_counter() - t0
  # Resume: the same call with more steps continues from the last checkpoint.
  more = max(steps // 4, 2)
  config.train.num_steps = steps + more
  t0 = time.perf_counter()
  state = loop.train(config, work, task=task, frozen=frozen, make_iterator=make_iterator)
  resume_s = time.perf_counter() - t0
  _, restored_step = eval_run.restore_variables(work, task)
  return dict(
    arch="small" if args.small else "ViT-B/16",
    batch=config.train.batch_size,
    crop=config.data.crop_size,
    devices=jax.device_count(),
    data_prep_s=round(data_s, 1),
    first_run_steps=steps,
    first_run_s_incl_compile=round(first_s, 1),
    resumed_to_step=int(state.step),
    resume_run_s_incl_compile=round(resume_s, 1),
    restored_checkpoint_step=restored_step,
    restore_ok=restored_step == steps + more,
    workdir=work,
  )
