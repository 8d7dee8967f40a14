"""Training logs under the workdir: JSON lines and TensorBoard events (process 0 only).

  workdir/train_metrics.jsonl   one object per logged train step: step, loss, each term, lr, ...
  workdir/eval_metrics.jsonl    one object per evaluation: step, miou, ...
  workdir/tensorboard/          tensorboardX events: train/<name>, eval/<name> scalars, images
The workdir may be local or remote (gs://, through `etils.epath`). Object stores cannot append:
there the JSON files are rewritten whole at each record, and TensorBoard events are written to a
local temporary folder and uploaded to workdir/tensorboard/ at each record, flush and close.
On resume from step s, records with step > s (written by the run that died after its last
checkpoint) are dropped from the JSON files and purged from TensorBoard, so every file describes
one consistent history.

`summarize` and `console_line` turn the fetched per-step measurements of a log interval into the
logged scalars and the console line.
"""

import json
import logging
import math
import os
import shutil
import tempfile

import numpy as np
from etils import epath

log = logging.getLogger(__name__)

TRAIN_JSONL = "train_metrics.jsonl"
EVAL_JSONL = "eval_metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"


# Shown in fixed places of the console line; every other scalar is listed as a loss term.
_CONSOLE_FIXED = ("loss", "lr", "grad_norm", "param_norm", "steps_per_sec", "images_per_sec")


def format_duration(seconds: float) -> str:
  """`1h02m03s`; "?" when unknown (not finite)."""
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def summarize(measurements: list[dict], *, skip_prefix: str) -> dict:
  """Mean over a log interval of every measurement; `lr` is the last step's rate.

  measurements: one host dict of scalars per step; keys starting with `skip_prefix` (the train
  step's finiteness flags) are left out.
  """
  out = {}
  for k in measurements[-1]:
    if k.startswith(skip_prefix):
      continue
    last = measurements[-1][k]
    out[k] = float(last) if k == "lr" else float(np.mean([m[k] for m in measurements]))
  return out


def console_line(step: int, num_steps: int, scalars: dict, sps: float, batch_size: int) -> str:
  """One log line: step, loss, each term, lr, grad norm, throughput and ETA at `sps` steps/s."""
  terms = " ".join(f"{k} {v:.4f}" for k, v in scalars.items() if k not in _CONSOLE_FIXED)
  eta = (num_steps - step) / sps if sps > 0 else float("nan")
  return (
    f"step {step}/{num_steps} | loss {scalars['loss']:.4f} | {terms} | lr {scalars['lr']:.3e} | "
    f"grad_norm {scalars['grad_norm']:.3f} | {sps:.2f} steps/s {sps * batch_size:.1f} img/s | "
    f"ETA {format_duration(eta)}"
  )


def _truncate_jsonl(path: epath.Path, last_step: int) -> str:
  """Drops the records after last_step from a JSON-lines file; returns the text kept."""
  if not path.exists():
    return ""
  kept = []
  for line in path.read_text().splitlines():
    if line.strip() and json.loads(line).get("step", 0) <= last_step:
      kept.append(line)
  text = "".join(line + "\n" for line in kept)
  path.write_text(text)
  return text


def _json_value(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf; keep them readable.


class MetricWriter:
  """Writes scalars and images; a no-op when `enabled` is False (processes other than 0).

  resume_step: the step training restarts from (0 for a fresh run); later records are dropped.
  """

  def __init__(self, workdir, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._workdir = epath.Path(workdir)
    self._remote = "://" in str(workdir)
    self._jsonl = {}  # Remote workdir: file name -> its whole text, rewritten at each record.
    self._tb = self._tb_local = None
    if not enabled:
      return
    self._workdir.mkdir(parents=True, exist_ok=True)
    for name in (TRAIN_JSONL, EVAL_JSONL):
      kept = _truncate_jsonl(self._workdir / name, resume_step)
      if self._remote:
        self._jsonl[name] = kept
    try:
      import tensorboardX  # Deferred: only process 0 needs it.
    except ImportError:
      # The GPU image has no tensorboardX unless its wheel is carried; JSON logs still work.
      log.warning("tensorboardX is not installed: no TensorBoard events (JSON logs only).")
      return
    logdir = str(self._workdir / TENSORBOARD_SUBDIR)
    if self._remote:  # Events go to a local folder first; _upload copies them to the workdir.
      logdir = self._tb_local = tempfile.mkdtemp(prefix="ssr_jax_tensorboard_")
    self._tb = tensorboardX.SummaryWriter(
      logdir=logdir,
      purge_step=resume_step + 1 if resume_step else None,
    )

  def write_scalars(self, step: int, scalars: dict, *, kind: str = "train") -> None:
    """One JSON line in `<kind>_metrics.jsonl` and `<kind>/<name>` TensorBoard scalars."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
    name = f"{kind}_metrics.jsonl"
    if self._remote:  # No append on object stores: rewrite the file (kept whole in memory).
      self._jsonl[name] = self._jsonl.get(name, "") + json.dumps(record) + "\n"
      (self._workdir / name).write_text(self._jsonl[name])
    else:
      with (self._workdir / name).open("a") as f:
        f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))
      if self._remote:
        self.flush()

  def write_images(self, step: int, images: dict) -> None:
    """TensorBoard images; each value uint8 [H, W, 3] or [H, W]."""
    if not self.enabled:
      return
    for name, img in images.items():
      img = np.asarray(img)
      if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(
          f"write_images: image {name!r} has dtype {img.dtype} and shape {img.shape}; "
          "expected uint8 [H, W, 3] or [H, W]."
        )
      if self._tb is not None:
        self._tb.add_image(name, img, int(step), dataformats="HWC" if img.ndim == 3 else "HW")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._upload()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
      self._upload()
      if self._tb_local is not None:
        shutil.rmtree(self._tb_local, ignore_errors=True)
        self._tb_local = None

  def _upload(self) -> None:
    """Copies the local TensorBoard events of a remote workdir to workdir/tensorboard/."""
    if self._tb_local is None:
      return
    for root, _, names in os.walk(self._tb_local):
      for name in names:
        src = os.path.join(root, name)
        dst = self._workdir / TENSORBOARD_SUBDIR / os.path.relpath(src, self._tb_local)
        with open(src, "rb") as f:
          dst.parent.mkdir(parents=True, exist_ok=True)
          dst.write_bytes(f.read())
