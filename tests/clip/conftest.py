"""A tiny random transformers CLIPModel saved as a Hugging Face directory (the parity oracle)."""

import pytest
from clip_oracle import perturb_, tiny_hf_config


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
  """(directory with config.json + model.safetensors, the eager-attention torch CLIPModel)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.CLIPModel._from_config(tiny_hf_config(), attn_implementation="eager")
  perturb_(model)
  model.eval()
  d = tmp_path_factory.mktemp("hf_tiny")
  model.save_pretrained(d, safe_serialization=True)
  return d, model
