"""Does this host's jax compile SSR correctly? The compiled step against the same code op by op.

    python -m ssr_jax.check_install [--config configs/voc.py] [--layers 2] [--batch 2]

jax/jaxlib 0.10.2 on CPU miscompiles `jit(vmap(vjp))` of a per-token normalisation at some
shapes (VOC's 400 tokens among them): the CAMs through CMPA's heads came out wrong by up to 1.0
and the loss by 10-14 %, while tiny test shapes were exact. Such bugs hide in the compiler, not
in the code, so this check runs the real program at the real widths and token counts on this
host's default backend (CPU, GPU or TPU) and compares it with `jax.disable_jit()`:
1. the minimal reproducer (`vmap_vjp_error`) at the shapes known to trip 0.10.2;
2. the train step (CLIP ViT-B/16 and DINO ViT-S/16 widths with random weights and `--layers`
   layers, 320 px crops = a 20x20 grid, the config's classes, CMPA + SGC + DINO on) in each phase:
   frozen CLIP's CAMs, the heads' CAMs (with the first prototype refresh), after a refresh, and
   after the RFM switch; the loss, every metric, the gradients' norm and the whole updated state;
3. evaluation: `cam_outputs` (CAMs, probabilities) through the heads and through frozen CLIP, the
   decoder's logits, and the label maps of `predict_cam`, `predict_pseudo`, `predict_seg` and
   `predict.segment`.
It prints one line per comparison and exits with status 1 if any disagrees. Matmuls run at
"highest" precision in both paths, so TPUs' default bf16 passes do not read as disagreement.
"""

import argparse
import dataclasses
import functools
import importlib.metadata
import importlib.util
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax import machine, predict, testing
from ssr_jax.clip.model import CLIPConfig
from ssr_jax.dino.model import DINOConfig
from ssr_jax.eval import run as eval_run
from ssr_jax.train.state import create_train_state, make_optimizer
from ssr_jax.train.step import make_train_step

# [B, N, D] shapes of the reproducer: 0.10.2 is wrong at the first two (relative error 0.69,
# 0.27) and right at the others; every later release is right at all of them.
REPRO_SHAPES = ((2, 400, 16), (2, 400, 512), (1, 400, 16), (2, 100, 16), (4, 64, 8))
RTOL = 5e-3  # Largest |compiled - op by op| / scale accepted for float outputs (see _max_rel).
# The largest seen on a correct jax: 6e-4, the heads' first moments at the refresh step (BatchNorm
# over a few samples amplifies rounding); the 0.10.2 bug gave 0.27-0.69.
MIN_AGREEMENT = 0.999  # Smallest share of equal pixels accepted for label maps (argmax ties).
CROP = 320
# Train steps at which the compiled step is compared (refresh_every = cam_start_step = 2,
# rfm_switch_step = 4): the name says what that step computes.
PHASES = {
  0: "frozen CLIP CAMs",
  2: "heads' CAMs, first prototype refresh",
  3: "heads' CAMs after a refresh",
  4: "after the RFM switch",
}


def vmap_vjp_error(shape, *, cotangents: int = 6, seed: int = 0) -> float:
  """Relative error of jit(vmap(pullback)) against op by op for f(x) = x * sum(x*x, -1).

  shape: x's [B, N, D]. This is the per-token L2 normalisation's pullback, batched over
  cotangents as GradCAM does for each class.
  """
  kx, kc = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, shape)
  cts = jax.random.normal(kc, (cotangents, *shape))
  pullback = jax.vjp(lambda x: x * jnp.sum(x * x, -1, keepdims=True), x)[1]
  compiled = np.asarray(jax.jit(jax.vmap(pullback))(cts)[0])
  with jax.disable_jit():
    reference = np.asarray(jax.vmap(pullback)(cts)[0])
  return float(np.abs(compiled - reference).max() / np.abs(reference).max())


def real_shape_config(config, *, layers: int):
  """config with the check's model: every field as configured, except the layer counts that must
  fit `layers`, and the phase steps of PHASES (prototype refresh and heads' CAMs from step 2, RFM
  from step 4, a 64-sample bank)."""
  c = config.copy_and_resolve_references()
  m = c.model
  m.cam.num_attn_layers = min(m.cam.num_attn_layers, layers)
  m.cam.rfm_layers = min(m.cam.rfm_layers, layers)
  m.cam.dino_layers = min(m.cam.dino_layers, layers)
  m.cam.rfm_switch_step = 4
  m.cmpa.refresh_every = m.cmpa.cam_start_step = 2
  m.cmpa.bank_size = 64
  m.dtype = "float32"
  c.data.crop_size = CROP
  c.eval.update(scales=(1.0,), flip=True, long_side=CROP, batch_size=2, crf=False)
  return c


def real_shape_models(layers: int) -> tuple[CLIPConfig, DINOConfig]:
  """CLIP ViT-B/16 (width 768, 12 heads, embedding 512) and DINO ViT-S/16 (384, 6 heads) with
  `layers` layers each; a token-free text tower (the task reads precomputed text embeddings)."""
  clip = CLIPConfig(
    embed_dim=512,
    image_size=224,
    patch_size=16,
    vision_width=768,
    vision_layers=layers,
    vision_heads=12,
    context_length=8,
    vocab_size=64,
    text_width=64,
    text_layers=1,
    text_heads=2,
  )
  dino = DINOConfig(image_size=224, patch_size=16, width=384, layers=layers, heads=6, mlp=1536)
  return clip, dino


def _max_rel(a, b, *, floor: float = 0.0) -> float:
  """max |a - b| / scale over a pytree's float leaves (exact equality for the others).

  A leaf's scale is its own max |b|, but at least `floor` times the largest |b| in the tree: a
  parameter whose true gradient is zero (e.g. an attention key bias, to which the softmax is
  invariant) gets rounding noise that Adam normalises to a full step, in either path; such a
  leaf is held to the tree's scale, not to its own noise.
  """
  xs, ys = [np.asarray(x) for x in jax.tree.leaves(a)], [np.asarray(y) for y in jax.tree.leaves(b)]
  if len(xs) != len(ys):
    return float("inf")
  floats = [np.abs(y).max() for y in ys if np.issubdtype(y.dtype, np.floating) and y.size]
  tree_scale = max(floats, default=0.0) * floor
  worst = 0.0
  for x, y in zip(xs, ys, strict=True):
    if x.shape != y.shape:
      return float("inf")
    if not np.issubdtype(y.dtype, np.floating):
      worst = max(worst, float(np.mean(x != y)) / (1 - MIN_AGREEMENT))  # Scaled to the bound.
      continue
    if not np.isfinite(x).all() or not np.isfinite(y).all():
      return float("inf")
    if y.size:
      scale = max(float(np.abs(y).max()), tree_scale, 1e-12)
      worst = max(worst, float(np.abs(x - y).max()) / scale)
  return worst


@dataclasses.dataclass
class Comparison:
  name: str
  error: float  # Relative error (float outputs) or share of differing pixels (label maps).
  bound: float
  kind: str = "rel. error"

  @property
  def ok(self) -> bool:
    return self.error <= self.bound

  def line(self) -> str:
    verdict = "ok" if self.ok else "DISAGREES"
    return f"{self.name:<58} {self.kind} {self.error:.2e} (bound {self.bound:.0e})  {verdict}"


def _compare(name, compiled, reference, *, floor: float = 0.0) -> Comparison:
  return Comparison(name, _max_rel(compiled, reference, floor=floor), RTOL)


def _state_parts(state) -> dict:
  """The train state's parts as the check compares them: parameters (held to the whole tree's
  scale: one Adam step moves a zero-initialised bias by ~lr whatever the gradient), the model
  state (BatchNorm statistics, prototype bank), the optimizer's first moments (linear in the
  gradients) and second moments, and the counters."""
  parts = {"params": state.params, "model_state": state.model_state, "mu": [], "nu": []}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
    names = {getattr(k, "name", getattr(k, "key", None)) for k in path}
    parts["nu" if "nu" in names else "mu"].append(leaf)
  parts["counters"] = (state.step, state.rng, state.nonfinite_step, state.nonfinite_count)
  return parts


# Per-leaf scale floors (see _max_rel) of the state's parts.
_FLOORS = {"params": 1.0, "model_state": 1e-3, "mu": 1e-3, "nu": 1e-3, "counters": 0.0}


def _compare_labels(name, compiled, reference) -> Comparison:
  differ = np.mean([np.mean(a != b) for a, b in zip(compiled, reference, strict=True)])
  return Comparison(name, float(differ), 1 - MIN_AGREEMENT, "pixels differing")


def _op_by_op(fn, *args, **kwargs):
  with jax.disable_jit():
    return fn(*args, **kwargs)


def _fetch(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def build(config, *, layers: int, batch_size: int, seed: int = 0):
  """(task, frozen, train state, step function, batch) of the check at the real shapes."""
  c = real_shape_config(config, layers=layers)
  clip_cfg, dino_cfg = real_shape_models(layers)
  task, frozen = testing.random_build(c, clip_cfg=clip_cfg, dino_cfg=dino_cfg, seed=seed)
  if not (task.options.cmpa.heads and task.options.sgc.enabled and task.dino is not None):
    raise ValueError(
      "the check needs CMPA's heads, SGC and DINO on (model.cmpa.site='clip', model.sgc.enabled, "
      "model.cam.dino_weight > 0): use configs/voc.py or configs/coco.py"
    )
  batch = testing.fake_batch(batch_size, CROP, c.data.num_classes - 1, seed=seed)
  tx, schedule = make_optimizer(c.train)
  state = jax.jit(functools.partial(create_train_state, task, tx))(jax.random.PRNGKey(seed), batch)
  step_fn = make_train_step(task, tx, schedule=schedule, nan_policy="halt")
  return c, task, frozen, state, step_fn, batch


def check_train_step(
  task, frozen, state, step_fn, batch, *, report=print, phases=None
) -> tuple[list, object]:
  """Compares the compiled train step with op by op at each of PHASES, advancing the state with
  the compiled step in between. phases: a subset of PHASES (default all). Returns (comparisons,
  the state after the last phase)."""
  phases = PHASES if phases is None else phases
  out = []
  jitted = jax.jit(step_fn)
  batch = jax.tree.map(jnp.asarray, batch)
  for s in range(max(phases) + 1):
    compiled_state, compiled_metrics = jitted(state, frozen, batch)
    if s in phases:
      ref_state, ref_metrics = _op_by_op(step_fn, state, frozen, batch)
      cm, rm = _fetch(compiled_metrics), _fetch(ref_metrics)
      for key in sorted(k for k in rm if not k.startswith("finite/")):
        out.append(_compare(f"train step {s} ({PHASES[s]}): {key}", cm[key], rm[key]))
        report(out[-1].line())
      cs, rs = _state_parts(_fetch(compiled_state)), _state_parts(_fetch(ref_state))
      for part, floor in _FLOORS.items():
        out.append(
          _compare(f"train step {s} ({PHASES[s]}): {part}", cs[part], rs[part], floor=floor)
        )
        report(out[-1].line())
    state = compiled_state
  return out, state


class _Examples(list):
  """In-memory eval examples with the part of EvalDataset's interface predict_seg reads."""

  def image_sizes(self) -> list[tuple[int, int]]:
    return [ex["image"].shape[:2] for ex in self]

  def iterate(self, positions):
    return (self[k] for k in positions)


def check_eval(task, frozen, variables, batch, eval_cfg, *, report=print, wrappers=True) -> list:
  """Compares evaluation's outputs compiled vs op by op on the batch's images as eval examples.

  wrappers: also the label maps of the predict_* generators and `predict.segment` (batched over
  this process's devices, so op by op they cost a batch per device).
  """
  out = []
  examples = [
    dict(
      image=np.asarray(batch["image"][i]),
      labels=np.asarray(batch["labels"][i]),
      superpixels=np.asarray(batch["superpixels"][i]),
      clusters=np.asarray(batch["clusters"][i]),
    )
    for i in range(len(batch["image"]))
  ]
  for source in ("cmpa", "clip"):
    ex = examples[0]
    compiled = eval_run.cam_outputs(task, frozen, variables, ex, source=source)
    ref = _op_by_op(eval_run.cam_outputs, task, frozen, variables, ex, source=source)
    out.append(_compare(f"eval cam_outputs ({source}): cams", compiled["cams"], ref["cams"]))
    report(out[-1].line())
    for key in ("cam_labels", "pseudo"):
      out.append(
        _compare_labels(f"eval cam_outputs ({source}): {key}", [compiled[key]], [ref[key]])
      )
      report(out[-1].line())
  images = jnp.asarray(np.stack([ex["image"] for ex in examples]))
  logits = jax.jit(task.seg_logits)(variables, frozen, images)
  out.append(
    _compare("eval seg_logits", logits, _op_by_op(task.seg_logits, variables, frozen, images))
  )
  report(out[-1].line())

  def labels(fn):
    return [np.asarray(pred) for _, pred in sorted(fn(), key=lambda r: _key(r[0]))]

  def _key(ex_or_index):
    return ex_or_index if isinstance(ex_or_index, int) else int(ex_or_index["index"])

  if not wrappers:
    return out
  for i, ex in enumerate(examples):
    ex["index"] = i
  dataset = _Examples(examples)
  runs = {
    "predict_cam": lambda: eval_run.predict_cam(task, frozen, variables, examples),
    "predict_pseudo": lambda: eval_run.predict_pseudo(task, frozen, variables, examples),
    "predict_seg": lambda: eval_run.predict_seg(task, frozen, variables, dataset, eval_cfg),
    "predict.segment": lambda: predict.segment(
      task, frozen, variables, [ex["image"] for ex in examples], eval_cfg
    ),
  }
  for name, fn in runs.items():
    out.append(_compare_labels(f"eval {name}: labels", labels(fn), _op_by_op(labels, fn)))
    report(out[-1].line())
  return out


def run_checks(config, *, layers: int = 2, batch_size: int = 2, report=print) -> list:
  """Every comparison of this module for a config; returns the Comparisons."""
  out = []
  for shape in REPRO_SHAPES:
    out.append(Comparison(f"jit(vmap(vjp)) reproducer {list(shape)}", vmap_vjp_error(shape), 1e-5))
    report(out[-1].line())
  c, task, frozen, state, step_fn, batch = build(config, layers=layers, batch_size=batch_size)
  steps, state = check_train_step(task, frozen, state, step_fn, batch, report=report)
  variables = {"params": state.params, **state.model_state}
  return out + steps + check_eval(task, frozen, variables, batch, c.eval, report=report)


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("check_config", path)
  if spec is None:
    raise SystemExit(f"check_install: --config {path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/voc.py", help="VOC's or COCO's config (classes).")
  p.add_argument("--layers", type=int, default=2, help="ViT layers (widths are the real ones).")
  p.add_argument("--batch", type=int, default=2)
  a = p.parse_args(argv)
  if a.layers < 2 or a.batch < 1:
    raise SystemExit("check_install: --layers must be >= 2 and --batch >= 1")
  config = _load_config(a.config)
  print(
    f"jax {jax.__version__}, jaxlib {importlib.metadata.version('jaxlib')}, Python "
    f"{sys.version.split()[0]}, backend {jax.default_backend()} ({jax.devices()[0].device_kind})"
    f"\n{machine.cpu_line()}"
  )
  print(
    f"{a.config}: {config.data.num_classes} classes, {a.layers} layers at ViT-B/16 / ViT-S/16 "
    f"widths, {CROP} px crops ({(CROP // 16) ** 2} tokens), batch {a.batch}"
  )
  t0 = time.time()
  with jax.default_matmul_precision("highest"):
    results = run_checks(config, layers=a.layers, batch_size=a.batch)
  bad = [r for r in results if not r.ok]
  print(
    f"{len(results) - len(bad)} of {len(results)} comparisons agree ({time.time() - t0:.0f} s)."
  )
  if bad:
    print(
      "This jax computes SSR's step wrongly when compiled. Use the versions README 'Environment' "
      "lists, and report the lines above to the jax issue tracker."
    )
    return 1
  print("The compiled step computes what the code says on this host.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
