"""Tiny random transformers ViTModels saved as Hugging Face directories (the parity oracles)."""

import pytest
from dino_oracle import perturb_, tiny_vit_config


@pytest.fixture(scope="session", params=[False, True], ids=["no_pooler", "pooler"])
def hf_vit(request, tmp_path_factory):
  """(directory with config.json + model.safetensors, the eager-attention torch ViTModel)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.ViTModel._from_config(
    tiny_vit_config(), add_pooling_layer=request.param, attn_implementation="eager"
  )
  perturb_(model)
  model.eval()
  d = tmp_path_factory.mktemp("hf_vit")
  model.save_pretrained(d, safe_serialization=True)
  return d, model
