"""Two processes on localhost (4 fake CPU devices each), joined by jax.distributed through
launch.py's config fields, train exactly like one process with 8 devices; the checkpoint they
write is restored by a single process for evaluation, and a two-process evaluation (each host
scoring its slice) gives the single process's figures."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from ssr_jax.clip import convert
from ssr_jax.clip.model import CLIP, CLIPConfig, init_params
from ssr_jax.dino import DINO, DINOConfig
from ssr_jax.dino import convert as dino_convert
from ssr_jax.dino import init_params as dino_init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG = """
from configs import demo


def get_config():
  c = demo.get_config()
  c.clip.weights = {weights!r}
  c.dino.weights = {dino!r}
  c.data.root = {data!r}
  c.data.synthetic.num_train = 32
  c.data.synthetic.num_val = 8
  c.data.synthetic.image_size = 32
  c.data.crop_size = 32
  c.data.num_workers = 1
  c.model.cam.num_attn_layers = 2
  c.model.cam.rfm_layers = 2
  c.model.cam.dino_layers = 1  # The random DINO's one layer, fused as the demo fuses its DINO.
  c.model.cam.par_iters = 2
  c.model.decoder.embed_dim = 16
  c.model.decoder.num_heads = 2
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 4
  c.eval.batch_size = 8
  c.eval.num_vis = 1
  c.eval.targets = ("seg", "pseudo")
  return c
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(config, workdir, mode, *, devices, processes=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = str(ROOT)
  base = [sys.executable, str(ROOT / "launch.py"), f"--config={config}", f"--workdir={workdir}"]
  base.append(f"--mode={mode}")
  if processes > 1:
    port = _free_port()
    base += [
      "--config.train.distributed=True",
      f"--config.train.coordinator_address=localhost:{port}",
      f"--config.train.num_processes={processes}",
    ]
  procs = [
    subprocess.Popen(
      base + ([f"--config.train.process_id={i}"] if processes > 1 else []),
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


def _losses(workdir):
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _eval_metrics(workdir, target):
  with open(os.path.join(workdir, "eval", f"metrics_val_{target}.json")) as f:
    return json.load(f)


def test_two_processes_train_like_one(tmp_path):
  cfg = CLIPConfig(
    embed_dim=32,
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=3,
    vision_heads=2,
    context_length=16,
    text_width=32,
    text_layers=1,
    text_heads=2,
  )
  weights = tmp_path / "clip.npz"
  convert.save_converted(weights, cfg, init_params(CLIP(cfg), jax.random.PRNGKey(0)))
  dino_cfg = DINOConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, mlp=32)
  dino = tmp_path / "dino.npz"
  dino_convert.save_converted(
    dino, dino_cfg, dino_init_params(DINO(dino_cfg), jax.random.PRNGKey(0))
  )
  config = tmp_path / "config.py"
  config.write_text(
    CONFIG.format(weights=str(weights), dino=str(dino), data=str(tmp_path / "data"))
  )
  one, two = tmp_path / "one", tmp_path / "two"

  _launch(config, one, "train", devices=8)
  _launch(config, two, "train", devices=4, processes=2)
  ref, got = _losses(one), _losses(two)
  assert [s for s, _ in got] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=1e-4)
  assert sorted(os.listdir(two / "checkpoints")) == ["4"]

  _launch(config, two, "eval", devices=4, processes=2)
  split_eval = {t: _eval_metrics(two, t) for t in ("seg", "pseudo")}
  _launch(config, two, "eval", devices=8)
  for target, m in split_eval.items():
    single = _eval_metrics(two, target)
    assert m["num_images"] == single["num_images"] == 8
    assert m["checkpoint_step"] == single["checkpoint_step"] == 4
    np.testing.assert_allclose(m["miou"], single["miou"], rtol=1e-6)
