"""Converted-weights .npz files (CLIP and DINO): flat float32 arrays plus one JSON metadata
entry, written atomically, and a digest of the arrays for files trained in-process."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from flax import traverse_util

META_KEY = "__meta__"


def flatten(params) -> dict[str, np.ndarray]:
  """Nested params -> {"a/b/kernel": float32 array}, the converted files' layout."""
  return {
    "/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()
  }


def digest(flat: dict[str, np.ndarray]) -> str:
  """sha256 (hex) of the arrays' names, shapes and bytes: the fingerprint of weights that have
  no source file (trained in-process), independent of how the .npz was zipped."""
  h = hashlib.sha256()
  for k in sorted(flat):
    h.update(f"{k}:{flat[k].shape}".encode())
    h.update(np.ascontiguousarray(flat[k]).tobytes())
  return h.hexdigest()


def write(path, meta: dict, flat: dict, *, compress: bool = False):
  """Writes flat arrays + meta (JSON under META_KEY) to path. compress: zip-deflate (files that
  ship with the package)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    (np.savez_compressed if compress else np.savez)(
      f, **flat, **{META_KEY: np.asarray(json.dumps(meta))}
    )
  os.replace(tmp, path)  # Atomic: concurrent readers never see a half-written file.


def read_metadata(path) -> dict:
  """The JSON metadata of a converted .npz without reading its arrays ({} if it has none)."""
  with np.load(path, allow_pickle=False) as z:
    return json.loads(str(z[META_KEY])) if META_KEY in z.files else {}
