"""TFDS builds of the datasets, superpixels inside: the builders and the build command.

One build per (dataset, superpixel settings) lives in
`<data.tfds_data_dir>/ssr_<data.name>/<config>/1.0.0/` as array_record shards (random access, so
the TF-free input path reads it without TensorFlow; `tfds.data_source`), with TFDS's
`dataset_info.json` / `features.json` and a `metadata.json` of the split ids and labels (read at
start-up instead of scanning every record). Readable by any TFDS tool:
`tfds.builder_from_directory(path).as_data_source("val")`.

Features of one record (the bytes of the folder source, untouched, so both sources decode to the
same arrays):
  image        the original JPEG/PNG file (`tfds.features.Image`, stored as is)
  mask         the class-index PNG (255 ignore; VOC's palette PNGs keep their indices)
  labels       float32 [C-1] image-level labels (from the masks or data.labels_file)
  id           the image id
  superpixels  uint16 PNG of the precomputed SLIC map          } configs with superpixels only
  clusters     uint8 PNG of its colour clusters (SGC regions)  }
The builder config is `plain`, or, with superpixels, the superpixel and cluster folder names
(`superpixels_skimage_100.clusters_k8`): the settings that made them are part of the name, so a
run never reads maps made with other settings. Records follow the split list's order (no
shuffling): record k is split index k before unlabeled training images are dropped.

Builders: `SsrVoc`, `SsrCoco`, `SsrSynthetic` (manual_dir = the dataset folder that data.root
names; `download_and_prepare` works as for any TFDS builder, serially). The command writes the same
builds in parallel and resumably:

  python -m ssr_jax.data.tfds_build --config configs/voc.py --config.data.root=... \\
      --config.data.tfds_data_dir=DIR [--splits train_aug,val,train] [--superpixels auto|yes|no]

Shards are written by worker processes, each to a temporary name then renamed; a rerun skips
shards that are complete (their record count checked), so an interrupted build resumes. Every
record is decoded and checked while writing (sizes, mask values, superpixel and cluster maps); bad
inputs are listed by file name and nothing is published. Superpixels are taken from the
precompute's folder (run `python -m ssr_jax.data.superpixels` first; its error says so). A gs://
tfds_data_dir works: each shard is written locally and uploaded as soon as it is complete (a
rerun skips the uploaded ones).

The command is this package's `__main__.py`: TFDS takes a builder's package from its module
(`dataset_info.json`'s moduleName; Python 3.11 fails with "'__main__' is not a package"), and
spawned shard writers import this module by name, so the builders never live in `__main__`.
"""

import dataclasses
import json
import logging
import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ssr_jax.data import examples, files, folder, parallel, sources
from ssr_jax.data.dataset import label_values
from ssr_jax.data.files import DataError
from ssr_jax.data.records import VERSION, config_name, split_name

log = logging.getLogger(__name__)

SHARD_SIZE = 1024  # Records per shard (~100 MB of VOC JPEGs).


@dataclasses.dataclass(frozen=True)
class BuildSpec:
  """What a build holds: the dataset, its classes and whether superpixels are inside."""

  dataset: str  # data.name
  num_classes: int
  superpixels: bool


def features(spec: BuildSpec) -> tfds.features.FeaturesDict:
  maps = {}
  if spec.superpixels:
    maps = {
      "superpixels": tfds.features.Image(shape=(None, None, 1), dtype=np.uint16),
      "clusters": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
    }
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
      "labels": tfds.features.Tensor(shape=(spec.num_classes - 1,), dtype=np.float32),
      "id": tfds.features.Text(),
      **maps,
    }
  )


class _Builder(tfds.core.GeneratorBasedBuilder):
  """A dataset of ssr_jax as TFDS: manual_dir is data.root; settings come from a data config."""

  VERSION = tfds.core.Version(VERSION)
  DATASET = ""  # data.name
  SPLITS = ()  # What `download_and_prepare` builds.
  MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir is the dataset folder that data.root names."

  def __init__(self, *, data_cfg=None, superpixels: bool = False, **kwargs):
    import configs.base

    cfg = configs.base.get_config().data if data_cfg is None else data_cfg
    if cfg.name != self.DATASET:
      cfg = _with(cfg, name=self.DATASET)
    if not cfg.num_classes and cfg.root:  # A folder dataset's count is its classes.txt's.
      cfg = _with(cfg, num_classes=sources.get_dataset(cfg).num_classes)
    self._data_cfg = cfg
    self._spec = BuildSpec(self.DATASET, int(cfg.num_classes), bool(superpixels))
    config = tfds.core.BuilderConfig(name=config_name(cfg, superpixels))
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, **kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
      features=features(self._spec),
      disable_shuffling=True,  # Record k is split index k.
      metadata=tfds.core.MetadataDict(),
      description=f"ssr_jax's {self.DATASET} segmentation dataset ({__name__}).",
    )

  def _split_generators(self, dl_manager):
    cfg = _with(self._data_cfg, root=os.fspath(dl_manager.manual_dir))
    plans = {p.name: p for p in (plan_split(cfg, s, self._spec) for s in self.splits(cfg))}
    self.info.metadata.update(index_metadata(self._spec, plans))
    return {s: self._generate_examples(p) for s, p in plans.items()}

  def splits(self, data_cfg) -> tuple[str, ...]:
    """What `download_and_prepare` builds."""
    del data_cfg
    return self.SPLITS

  def _generate_examples(self, plan):
    for k in range(len(plan.ids)):
      yield k, encode_record(plan, k)[0]


class SsrVoc(_Builder):
  """PASCAL VOC 2012 + SBD (train_aug / val / train)."""

  DATASET = "voc"
  SPLITS = ("train_aug", "val", "train")


class SsrCoco(_Builder):
  """COCO 2014 with the WSSS semantic masks of `python -m ssr_jax.data.coco`."""

  DATASET = "coco"
  SPLITS = ("train", "val")


class SsrSynthetic(_Builder):
  """The synthetic demo dataset."""

  DATASET = "synthetic"
  SPLITS = ("train", "val")


class SsrFolder(_Builder):
  """Your own tagged images (data.name = "folder"): every split of its labels.csv."""

  DATASET = "folder"

  def splits(self, data_cfg) -> tuple[str, ...]:
    return tuple(folder.index_of(data_cfg).split_names())


BUILDERS = {b.DATASET: b for b in (SsrVoc, SsrCoco, SsrSynthetic, SsrFolder)}


def _with(data_cfg, **changes):
  cfg = data_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.update(changes)
  return cfg


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """One split's source files, in record order."""

  name: str
  ids: tuple[str, ...]
  labels: np.ndarray  # float32 [N, C-1]
  store: examples.FileStore  # Record k's files: store.ref(k).
  num_classes: int
  class_names: tuple[str, ...]  # Foreground names (mask value c+1 for class_names[c]).
  prompts: tuple[str, ...]  # CLIP names of the classes.
  bg_names: tuple[str, ...]  # Background prompts the dataset defines (synthetic, folder) or ().


def plan_split(data_cfg, split: str, spec: BuildSpec) -> SplitPlan:
  """The folder source's files of a split (checked as training checks them)."""
  maps = spec.superpixels
  s, store = sources.open_folder_split(data_cfg, split, superpixels=maps, clusters=maps)
  ds = sources.get_dataset(data_cfg)
  prompts = ds.prompts or ds.class_names
  return SplitPlan(
    split_name(split), s.ids, s.labels, store, s.num_classes, ds.class_names, prompts, ds.bg_names
  )


def encode_record(plan: SplitPlan, k: int) -> tuple[dict, str | None]:
  """(record dict of encoded bytes, problem or None) for record k; decodes to check it."""
  enc = plan.store.ref(k).fetch()
  try:
    examples.decode_example(enc, plan.num_classes)
  except DataError as e:
    return {}, str(e)
  record = {"image": enc.image, "mask": enc.mask, "labels": plan.labels[k], "id": plan.ids[k]}
  if enc.superpixels is not None:
    record["superpixels"], record["clusters"] = enc.superpixels, enc.clusters
  return record, None


def index_metadata(spec: BuildSpec, plans: dict) -> dict:
  """metadata.json: class names, prompts, background prompts and, per split, the ids and labels
  (as mask values) in record order."""
  first = next(iter(plans.values()))
  return {
    "dataset": spec.dataset,
    "num_classes": spec.num_classes,
    "class_names": list(first.class_names),
    "prompts": list(first.prompts),
    "bg_names": list(first.bg_names),
    "superpixels": spec.superpixels,
    "splits": {
      name: {
        "ids": list(p.ids),
        "labels": label_values(p.labels),
      }
      for name, p in plans.items()
    },
  }


# ------------------------------------------------------------------------- parallel writer


def _shard_task(args):
  """Writes one shard (records [lo, hi) of a split) to `path`, then to `publish` if given (the
  shard's place in a gs:// build, uploaded at once so an interrupted build resumes from it).
  Returns (records, bytes, problems)."""
  plan, lo, hi, path, spec, publish = args
  feats = features(spec)
  records, problems = [], []
  for k in range(lo, hi):
    try:
      rec, problem = encode_record(plan, k)
    except DataError as e:
      rec, problem = {}, str(e)
    if problem:
      problems.append(problem)
    else:
      records.append(feats.serialize_example(rec))
  if problems:
    return 0, 0, problems
  from array_record.python import array_record_module

  tmp = f"{path}.tmp{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  os.replace(tmp, path)
  size = os.path.getsize(path)
  if publish:
    files.write_bytes(publish, epath.Path(path).read_bytes())
    os.remove(path)
  return len(records), size, []


def _complete(path: str, n: int) -> bool:
  if not os.path.isfile(path):
    return False
  from array_record.python import array_record_data_source

  try:
    return len(array_record_data_source.ArrayRecordDataSource([path])) == n
  except Exception:  # noqa: BLE001 - a torn file is rewritten.
    return False


def build(
  data_cfg,
  splits,
  *,
  superpixels: bool,
  workers: int = 0,
  shard_size: int = SHARD_SIZE,
  progress: bool = True,
) -> epath.Path:
  """Builds (or completes) the TFDS build of data_cfg's dataset; returns its version folder."""
  if data_cfg.name not in BUILDERS:
    raise ValueError(f"unknown data.name {data_cfg.name!r}; use one of {sorted(BUILDERS)}")
  if not data_cfg.tfds_data_dir:
    raise ValueError("set --config.data.tfds_data_dir to the folder (or gs:// bucket) to build in")
  if not data_cfg.num_classes:  # A folder dataset's count is its classes.txt's.
    data_cfg = _with(data_cfg, num_classes=sources.get_dataset(data_cfg).num_classes)
  builder = BUILDERS[data_cfg.name](
    data_cfg=data_cfg, superpixels=superpixels, data_dir=data_cfg.tfds_data_dir
  )
  spec = builder._spec
  final = epath.Path(builder.data_path)
  remote = "://" in os.fspath(final)
  # The splits' files are checked before anything is written.
  plans = {p.name: p for p in (plan_split(data_cfg, s, spec) for s in splits)}
  local = epath.Path(tempfile.mkdtemp(prefix="ssr_tfds_")) if remote else final
  local.mkdir(parents=True, exist_ok=True)
  meta, kept = _published(final, plans)
  metadata = index_metadata(spec, plans)
  split_infos, tasks, problems = [], [], []
  for name, plan in plans.items():
    built = meta.get("splits", {}).get(name)
    # Other ids or labels than the published split's: no shard is reused.
    changed = built is not None and built != metadata["splits"][name]
    n = len(plan.ids)
    num_shards = max(1, -(-n // shard_size))
    template = tfds.core.ShardedFileTemplate(
      data_dir=local, dataset_name=builder.name, split=name, filetype_suffix="array_record"
    )
    paths = [os.fspath(p) for p in template.sharded_filepaths(num_shards)]
    bounds = [(i * n // num_shards, (i + 1) * n // num_shards) for i in range(num_shards)]
    for (lo, hi), path in zip(bounds, paths):
      publish = os.fspath(final / os.path.basename(path)) if remote else ""
      done = epath.Path(publish).exists() if remote else _complete(path, hi - lo)
      if changed or not done:
        tasks.append((plan, lo, hi, path, spec, publish))
    split_infos.append((name, [hi - lo for lo, hi in bounds], paths))
  log.info("TFDS build %s: %d shard(s) to write", final, len(tasks))
  results = parallel.imap(
    _shard_task, tasks, workers=workers or parallel.usable_cpus(), chunksize=1
  )
  sizes = {}
  for task, (_, size, probs) in zip(tasks, _progress(results, len(tasks), progress)):
    sizes[task[3]], problems = size, problems + probs
  if problems:
    listed = "\n  ".join(problems[:10])
    raise DataError(
      f"{len(problems)} bad input(s) in {data_cfg.root}; nothing was published, fix them and "
      f"rerun (complete shards are kept):\n  {listed}"
    )
  infos = []
  for name, lengths, paths in split_infos:
    size = sum(sizes[p] if p in sizes else _size(final, p, remote) for p in paths)
    template = tfds.core.ShardedFileTemplate(
      data_dir=final, dataset_name=builder.name, split=name, filetype_suffix="array_record"
    )
    infos.append(tfds.core.SplitInfo(name, lengths, size, filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(infos + [info for info, _ in kept.values()]))
  metadata["splits"].update({name: m for name, (_, m) in kept.items()})
  builder.info.metadata.update(metadata)
  # Published last: a build without dataset_info.json is incomplete to every reader.
  builder.info.write_to_directory(final)
  return final


def _published(final: epath.Path, plans: dict):
  """(metadata.json of the build already at `final` or {}, {split: (SplitInfo, its metadata)}
  of its splits that this run does not rebuild, which stay in the build)."""
  if not (final / "dataset_info.json").exists():
    return {}, {}
  meta = json.loads((final / "metadata.json").read_text())
  old = tfds.builder_from_directory(os.fspath(final)).info.splits
  kept = {n: (old[n], meta["splits"][n]) for n in meta["splits"] if n not in plans and n in old}
  return meta, kept


def _progress(it, total, show):
  if not show:
    return it
  from tqdm import tqdm

  return tqdm(it, total=total, desc="shards", unit="shard")


def _size(final: epath.Path, local_path: str, remote: bool) -> int:
  """Bytes of a shard kept from an earlier run (local, or already uploaded to a gs:// build)."""
  if remote:
    return (final / os.path.basename(local_path)).stat().length
  return os.path.getsize(local_path)


def default_splits(config) -> list[str]:
  """The splits a run of this config reads: training, validation and evaluation."""
  out = [config.data.train_split, config.data.val_split, *config.eval.splits]
  return list(dict.fromkeys(s for s in out if s))


def needs_superpixels(config) -> bool:
  """Whether training or eval of this config reads superpixels (SGC on)."""
  from ssr_jax.model import ssr

  return any(ssr.sgc_inputs(config.model.sgc.enabled, config.model.sgc.grouping))
