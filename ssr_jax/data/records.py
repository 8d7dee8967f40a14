"""Reading a TFDS build (data.source = "tfds"), TensorFlow-free.

A build (the tfds_build package) stores each example's files unchanged, so a record fetched
here decodes, with the same functions as the folder source, to the same arrays: both sources
give the same batches bit for bit. Records are read by random access from the array_record
shards through `tfds.data_source`, which needs no TensorFlow (tensorflow_datasets imports it
lazily and these reads never do); ids and labels come from the build's metadata.json, so
start-up does not scan the records. `data.tfds_data_dir` may be a local folder or gs://
(array_record reads GCS itself).
"""

import dataclasses
import functools
import json
import threading

from etils import epath

from ssr_jax.data import superpixels as sp_lib
from ssr_jax.data.dataset import Split, drop_unlabeled_images, labels_from_values
from ssr_jax.data.examples import Encoded
from ssr_jax.data.files import DataError

_LOCK = threading.Lock()

VERSION = "1.0.0"
PLAIN = "plain"  # The config of builds without superpixel maps.
ENCODED = ("image", "mask", "superpixels", "clusters")  # Features kept as their file bytes.


def builder_name(dataset: str) -> str:
  return f"ssr_{dataset}"


def split_name(split: str) -> str:
  """The build's name of a split: the split itself, or a list file's stem (data.train_split may
  be a path to a list file)."""
  if split.endswith(".txt") or "/" in split:
    split = epath.Path(split).stem
  if not split.replace("_", "").isalnum():
    raise DataError(f"split {split!r} cannot name a TFDS split (letters, digits and _ only)")
  return split


def config_name(data_cfg, maps: bool) -> str:
  """`plain`, or the superpixel and cluster folder names of data_cfg (their settings)."""
  if not maps:
    return PLAIN
  sp_dir = epath.Path(sp_lib.directory(data_cfg, data_cfg.root or "."))
  k, w = data_cfg.color_clusters, data_cfg.cluster_position_weight
  return f"{sp_dir.name}.{sp_lib.cluster_folder(k, w)}".lower()


def build_dir(data_cfg, *, maps: bool) -> epath.Path:
  """The version folder of the build this config reads; DataError if it is missing.

  maps: the run reads superpixels/colour clusters, so only the build that holds the maps of
  these settings will do; otherwise the plain build, or that one.
  """
  if not data_cfg.tfds_data_dir:
    raise DataError(
      "data.source is 'tfds' but data.tfds_data_dir is empty: set --config.data.tfds_data_dir "
      "to the folder (or gs:// bucket) holding the build"
    )
  root = epath.Path(data_cfg.tfds_data_dir) / builder_name(data_cfg.name)
  wanted = [config_name(data_cfg, True)]
  if not maps:
    wanted.insert(0, PLAIN)
  for name in wanted:
    d = root / name / VERSION
    if (d / "dataset_info.json").exists():
      return d
  raise DataError(
    f"no TFDS build {' or '.join(wanted)} of {data_cfg.name} under {root} (an unfinished build "
    f"has no dataset_info.json); build it with python -m ssr_jax.data.tfds_build --config <your "
    f"config> --config.data.root=<dataset folder> --config.data.tfds_data_dir="
    f"{data_cfg.tfds_data_dir}" + (" --superpixels=yes" if maps else "")
  )


@functools.lru_cache(maxsize=8)
def _metadata(build: str) -> dict:
  try:
    return json.loads((epath.Path(build) / "metadata.json").read_text())
  except (FileNotFoundError, ValueError) as e:
    raise DataError(
      f"TFDS build {build} has no readable metadata.json ({e}); rebuild it with python -m "
      "ssr_jax.data.tfds_build"
    ) from None


def require_tfds() -> None:
  """DataError with the install line when tensorflow-datasets is missing."""
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    raise DataError(
      "data.source='tfds' needs tensorflow-datasets (not TensorFlow): pip install "
      "tensorflow-datasets==4.9.10 importlib_resources array_record==0.8.6, or read the folders "
      "with --config.data.source=files"
    ) from None


def class_names(data_cfg) -> tuple[str, ...]:
  """Foreground class names stored in the build this config reads."""
  build = build_dir(data_cfg, maps=False)
  return tuple(_metadata(str(build))["class_names"])


def dataset_fields(data_cfg) -> dict:
  """sources.dataset_fields of the build this config reads (its metadata.json)."""
  meta = _metadata(str(build_dir(data_cfg, maps=False)))
  names = tuple(meta["class_names"])
  labels = [v for s in meta["splits"].values() for v in s["labels"]]
  return dict(
    num_classes=int(meta["num_classes"]),
    class_names=names,
    prompts=tuple(meta.get("prompts") or names),
    bg_names=tuple(meta.get("bg_names") or ()),
    max_labels=max([1, *(len(v) for v in labels)]),
  )


def open_split(
  data_cfg, split: str, *, superpixels: bool, clusters: bool, drop_unlabeled: bool = False
):
  """(Split, RecordStore) of a split of the build; Split.image_paths/mask_paths are empty."""
  require_tfds()
  build = build_dir(data_cfg, maps=superpixels or clusters)
  meta = _metadata(str(build))
  split = split_name(split)
  if int(meta["num_classes"]) != int(data_cfg.num_classes):
    raise DataError(
      f"data.num_classes is {data_cfg.num_classes} but the TFDS build {build} has "
      f"{meta['num_classes']} classes; fix the config"
    )
  if split not in meta["splits"]:
    raise DataError(
      f"TFDS build {build} has no split {split!r} (it has {sorted(meta['splits'])}); add it "
      f"with python -m ssr_jax.data.tfds_build --splits {split} (complete shards are kept)"
    )
  ids = tuple(meta["splits"][split]["ids"])
  labels = labels_from_values(meta["splits"][split]["labels"], data_cfg.num_classes)
  s = Split(
    dataset=data_cfg.name,
    name=split,
    root=str(build),
    ids=ids,
    image_paths=(),
    mask_paths=(),
    labels=labels,
    num_classes=int(data_cfg.num_classes),
  )
  if drop_unlabeled:
    s = drop_unlabeled_images(s)
  record = {i: k for k, i in enumerate(ids)}  # Ids are unique within a split.
  refs = tuple(record[i] for i in s.ids)
  return s, RecordStore(str(build), split, refs, superpixels, clusters)


@dataclasses.dataclass(frozen=True)
class RecordRef:
  """One record of a build; fetch() opens the split's data source once per process."""

  build: str
  split: str
  record: int
  superpixels: bool  # Read the superpixel map.
  clusters: bool  # Read the colour-cluster map.

  def fetch(self) -> Encoded:
    where = f"record {self.record} of split {self.split} of the TFDS build {self.build}"
    fix = (
      f"the build is corrupt: delete {self.build} and rebuild it with python -m "
      "ssr_jax.data.tfds_build"
    )
    try:
      r = data_source(self.build, self.split)[self.record]
    except Exception as e:  # noqa: BLE001 - array_record / proto errors, re-raised by name.
      raise DataError(f"cannot read {where} ({type(e).__name__}: {e}); {fix}") from None
    if (self.superpixels or self.clusters) and "superpixels" not in r:
      raise DataError(f"{where} has no superpixel maps; {fix} with --superpixels=yes")
    wanted = ["id", "image", "mask"] + ["superpixels"] * self.superpixels
    empty = [k for k in wanted + ["clusters"] * self.clusters if not r.get(k)]
    if empty:  # A damaged shard can yield records whose features are None.
      raise DataError(f"cannot read {where}: no {', '.join(empty)}; {fix}")
    name = f"{where} (id {r['id'].decode()})"
    return Encoded(
      r["image"],
      r["mask"],
      r["superpixels"] if self.superpixels else None,
      r["clusters"] if self.clusters else None,
      tuple(f"{k} of {name}" for k in ("image", "mask", "superpixels", "clusters")),
      fix,
    )


@dataclasses.dataclass(frozen=True)
class RecordStore:
  """Split index -> RecordRef."""

  build: str
  split: str
  records: tuple[int, ...]  # Record of each split index.
  superpixels: bool
  clusters: bool

  def ref(self, index: int) -> RecordRef:
    r = self.records[index]
    return RecordRef(self.build, self.split, r, self.superpixels, self.clusters)


_SOURCES = {}


def data_source(build: str, split: str):
  """The split's random-access tfds data source with encoded images left as bytes (cached)."""
  key = (build, split)
  with _LOCK:
    if key not in _SOURCES:
      import tensorflow_datasets as tfds  # Imports no TensorFlow (lazy inside TFDS).

      builder = tfds.builder_from_directory(build)
      skip = {k: tfds.decode.SkipDecoding() for k in ENCODED}
      skip = {k: v for k, v in skip.items() if k in builder.info.features}
      _SOURCES[key] = builder.as_data_source(split=split, decoders=skip)
    return _SOURCES[key]
