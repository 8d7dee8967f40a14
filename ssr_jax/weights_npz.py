"""Converted-weights .npz files (CLIP and DINO): flat float32 arrays plus one JSON metadata
entry, written atomically, a digest of the arrays for files trained in-process, and the cache
rules both converters share (where a cache goes, when it is valid, how it is read)."""

import dataclasses
import hashlib
import io
import json
import os
import warnings

import numpy as np
from etils import epath
from flax import traverse_util

META_KEY = "__meta__"
# The first bytes of what torch.load / torch.jit.load read: a zip archive (torch.save since 1.6,
# TorchScript) or a legacy pickle (protocol 2+ starts with 0x80).
_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_MAGIC = (_ZIP_MAGIC, b"\x80")


class WeightsError(ValueError):
  """A weights file its loader cannot read; the one-line message names the file, says it is not
  a valid CLIP/DINO weights file, and lists the accepted formats."""


def invalid(path, what: str, accepted: str, cause) -> WeightsError:
  """The WeightsError of `path`, not a valid `what` weights file because of `cause` (an exception
  or a sentence); accepted: the formats the loader reads."""
  if isinstance(cause, BaseException):
    text = (str(cause).strip().splitlines() or [""])[0][:160]
    cause = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
  return WeightsError(f"{path}: not a valid {what} weights file ({cause}); accepted: {accepted}")


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


def is_remote(path) -> bool:
  """Whether a path names an object store (gs://...) rather than a local file."""
  return "://" in str(path)


def absolute(path) -> str:
  """A source's absolute name: the resolved local path, or the gs:// URI as given."""
  return str(path) if is_remote(path) else os.path.realpath(path)


def write(path, meta: dict, flat: dict, *, compress: bool = False):
  """Writes flat arrays + meta (JSON under META_KEY) to path, local or gs:// (`etils.epath`).
  compress: zip-deflate (files that ship with the package)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {**flat, META_KEY: np.asarray(json.dumps(meta))}
  save = np.savez_compressed if compress else np.savez
  if is_remote(path):  # An object is published only once its upload completes.
    buf = io.BytesIO()  # zipfile seeks back while writing, which upload streams cannot do.
    save(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    save(f, **arrays)
  os.replace(tmp, path)  # Atomic: concurrent readers never see a half-written file.


def save_params(path, cfg, params, check, *, meta=None, compress=False, **identity) -> epath.Path:
  """Writes a model's params as a converted .npz its loader reads: check(flat, cfg, path) first
  (the model's tree), then the metadata `identity` (kind, version), the config, the sha256 of
  the arrays (its fingerprint) and meta under "extra"."""
  flat = flatten(params)
  path = epath.Path(path)
  check(flat, cfg, path)
  info = dict(**identity, config=dataclasses.asdict(cfg), sha256=digest(flat), extra=meta or {})
  write(path, info, flat, compress=compress)
  return path


def _open_npz(path):
  """np.load of an .npz through `etils.epath` (local or gs://); use inside the returned file's
  `with` block."""
  return epath.Path(path).open("rb")


def read_metadata(path) -> dict:
  """The JSON metadata of a converted .npz without reading its arrays ({} if it has none);
  ValueError naming the file when it is not a readable .npz."""
  try:
    with _open_npz(path) as f, np.load(f, allow_pickle=False) as z:
      return json.loads(str(z[META_KEY])) if META_KEY in z.files else {}
  except FileNotFoundError:
    raise
  except Exception as e:  # noqa: BLE001 - zipfile, numpy and json each raise their own.
    raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from e


def read_safetensors(path) -> dict[str, np.ndarray]:
  """A safetensors file's arrays (safetensors.numpy): read in place locally, from its bytes for
  a gs:// object (safetensors' load_file needs a local file name)."""
  from safetensors.numpy import load, load_file

  if is_remote(path):
    return load(epath.Path(path).read_bytes())
  return load_file(os.fspath(path))


def torch_source(path):
  """What torch.load / torch.jit.load take for a weights file: the local file name, or the
  bytes of a gs:// object in a fresh BytesIO (call again for a second attempt)."""
  if is_remote(path):
    return io.BytesIO(epath.Path(path).read_bytes())
  return os.fspath(path)


def sha256_file(path) -> str:
  """Hex sha256 of a file's bytes (local or gs://)."""
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


# ---------------------------------------------------------------- caches of converted weights


def stamp(path) -> dict:
  """Name, size and modification time of a source file: its cache is valid while they match."""
  path = epath.Path(path)
  if is_remote(path):  # Object stores report whole seconds.
    st = path.stat()
    return {"name": path.name, "size": st.length, "mtime": st.mtime}
  st = os.stat(path)
  return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def user_cache_dir() -> epath.Path:
  """$XDG_CACHE_HOME/ssr_jax, or ~/.cache/ssr_jax: where converted weights go by default."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return epath.Path(root) / "ssr_jax"


def cache_path(weights, cache_dir, *, prefix: str = "") -> epath.Path:
  """Where a source's converted .npz goes: in cache_dir (default `user_cache_dir()`, never beside
  the weights, whose folder may be read-only or a bucket) under a name keyed on the absolute
  source path, so one cache dir serves many sources."""
  weights = epath.Path(weights)
  tag = hashlib.sha1(absolute(weights).encode()).hexdigest()[:12]
  return (
    epath.Path(cache_dir or user_cache_dir()).expanduser() / f"{prefix}{weights.name}-{tag}.npz"
  )


def read(
  path, *, version: int, what: str, accepted: str, kind: str | None = None
) -> tuple[dict, dict]:
  """(metadata, flat arrays) of a converted .npz; a WeightsError naming the file when it is not
  an ssr_jax `what` cache (of `kind`, when given), a ValueError when it was written by another
  cache version. accepted: the loader's formats, quoted in the error."""
  flat = None
  try:
    with _open_npz(path) as f:
      if f.read(4) != _ZIP_MAGIC:  # Else numpy tries it as a pickle and says so.
        raise invalid(path, what, accepted, "not a zip archive, as .npz files are")
      f.seek(0)
      with np.load(f, allow_pickle=False) as z:
        meta = json.loads(str(z[META_KEY])) if META_KEY in z.files else None
        ok = meta is not None and (kind is None or meta.get("kind") == kind)
        if ok and meta.get("version") == version:
          flat = {k: z[k] for k in z.files if k != META_KEY}
  except (FileNotFoundError, WeightsError):
    raise
  except Exception as e:  # noqa: BLE001 - numpy's "pickled data", zipfile, zlib, json...
    raise invalid(path, what, accepted, e) from e
  if not ok:
    entry = f"{kind} {META_KEY}" if kind else META_KEY
    raise invalid(path, what, accepted, f"not an ssr_jax {what} cache: no {entry} entry")
  if flat is None:
    raise ValueError(
      f"{path}: cache version {meta.get('version')} != {version}; convert the original weights "
      "again"
    )
  return meta, flat


def write_cache(cache, meta: dict, flat: dict, *, what: str) -> None:
  """`write`, warning instead of failing where the cache location is not writable."""
  try:
    write(cache, meta, flat)
  except OSError as e:
    warnings.warn(
      f"could not write the {what} cache {cache} ({e}); set cache_dir to a writable directory "
      "to avoid converting on every load",
      stacklevel=3,
    )


def check_against_spec(sd: dict, spec: dict, path, *, what: str, ignored=()) -> None:
  """Raises one ValueError naming the file and every unknown, missing and mis-shaped key of a
  source state dict `sd` against a converter's spec {source key: (ours, shape, transform)}."""
  unknown = sorted(k for k in sd if k not in spec and k not in ignored)
  missing = sorted(k for k in spec if k not in sd)
  bad = sorted(
    f"{k}: expected {spec[k][1]}, got {tuple(sd[k].shape)}"
    for k in spec
    if k in sd and tuple(sd[k].shape) != spec[k][1]
  )
  if unknown or missing or bad:
    lines = [f"{path}: weights do not match the {what} config"]
    lines += [f"  unknown key {k}" for k in unknown]
    lines += [f"  missing key {k}" for k in missing]
    lines += [f"  wrong shape {k}" for k in bad]
    raise ValueError("\n".join(lines))


def valid_cache(cache, **expected) -> bool:
  """Whether `cache` exists, reads, and its metadata has every `expected` value (the cache
  version, the source files' stamps...): otherwise the source is converted again."""
  if not epath.Path(cache).is_file():
    return False
  try:
    meta = read_metadata(cache)
  except (OSError, ValueError):
    return False
  return all(meta.get(k) == v for k, v in expected.items())


def check_torch_file(path, *, what: str, accepted: str) -> None:
  """WeightsError unless the file starts as torch checkpoints do (checked before importing torch:
  random bytes are refused even where torch is not installed)."""
  with epath.Path(path).open("rb") as f:
    head = f.read(4)
  if not any(head.startswith(m) for m in _TORCH_MAGIC):
    cause = "neither a zip archive (torch.save, TorchScript) nor a legacy torch pickle"
    raise invalid(path, what, accepted, cause)


def import_torch(path, *, what: str):
  """torch, imported only where a torch checkpoint is converted; an ImportError naming the file
  and the way out (`what`: e.g. "an OpenAI .pt checkpoint") when it is not installed."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"{path}: reading {what} needs torch (pip install torch==2.13.0), or "
      "convert it once elsewhere and pass the resulting .npz"
    ) from e
  return torch
