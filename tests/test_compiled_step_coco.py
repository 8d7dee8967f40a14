"""The compiled train step and evaluation equal the same code run op by op at COCO's shapes
(test_compiled_step.py has the why, the reproducer and VOC's command)."""

import jax

from configs import coco
from ssr_jax import check_install


def test_compiled_equals_op_by_op_coco():
  """COCO's 81 classes (80 GradCAM cotangents through the heads): the train step's phases with
  the heads' CAMs, the CAMs and the decoder's logits."""
  with jax.default_matmul_precision("highest"):
    c, task, frozen, state, step_fn, batch = check_install.build(
      coco.get_config(), layers=2, batch_size=2
    )
    assert c.data.num_classes == 81 and batch["image"].shape == (2, 320, 320, 3)
    # The heads' CAMs, where COCO's 80 GradCAM cotangents enter (the VOC command runs them all).
    phases = {s: check_install.PHASES[s] for s in (2, 3)}
    steps, state = check_install.check_train_step(
      task, frozen, state, step_fn, batch, report=lambda _: None, phases=phases
    )
    variables = {"params": state.params, **state.model_state}
    # The predict_* wrappers batch over the 8 simulated devices; the VOC command covers them.
    evals = check_install.check_eval(
      task, frozen, variables, batch, c.eval, report=lambda _: None, wrappers=False
    )
  bad = [r.line() for r in steps + evals if not r.ok]
  assert not bad, "\n".join(bad)
  assert {r.name.split(":")[0] for r in steps} == {
    f"train step {s} ({name})" for s, name in phases.items()
  }
