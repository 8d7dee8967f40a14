"""Editing a Hugging Face weights directory (config.json + model.safetensors) for bad-input tests
of the CLIP and DINO loaders."""

import json
import shutil


def edited_copy(hf_dir, dst, *, config_edit=None, weights_edit=None):
  """A copy of hf_dir at dst with config_edit(config dict) and weights_edit(state dict) applied
  in place; returns dst."""
  from safetensors.numpy import load_file, save_file

  shutil.copytree(hf_dir, dst)
  if config_edit:
    cfg = json.loads((dst / "config.json").read_text())
    config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
  if weights_edit:
    sd = load_file(str(dst / "model.safetensors"))
    weights_edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
  return dst
