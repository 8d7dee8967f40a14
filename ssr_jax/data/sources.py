"""Where a split's examples come from: the dataset registry (data.name -> its folder reader: voc,
coco, synthetic, opened at data.root) and data.source ("files": those folders; "tfds": a TFDS
build in data.tfds_data_dir, records.py)."""

from ssr_jax.data import coco, synthetic, voc
from ssr_jax.data.dataset import Dataset
from ssr_jax.data.files import DataError


def get_dataset(data_cfg) -> Dataset:
  """The dataset named by data.name at data.root; its class count must match data.num_classes."""
  readers = {"voc": voc, "coco": coco, "synthetic": synthetic}
  if data_cfg.name not in readers:
    raise ValueError(f"unknown data.name {data_cfg.name!r}; use one of {sorted(readers)}")
  ds = readers[data_cfg.name].open_dataset(data_cfg.root, labels_file=data_cfg.labels_file)
  if ds.num_classes != data_cfg.num_classes:
    raise DataError(
      f"data.num_classes is {data_cfg.num_classes} but the {ds.name} dataset at {ds.root} "
      f"has {ds.num_classes} classes (including background); fix the config"
    )
  return ds


SOURCES = ("files", "tfds")


def open_split(
  data_cfg, split: str, *, superpixels: bool, clusters: bool = False, drop_unlabeled: bool = False
):
  """(Split, store) of a split from data.source; store.ref(split index) fetches an example.

  superpixels / clusters: whether the maps are read (checked to exist here: a DataError names
  what is missing and the command that makes it).
  """
  if data_cfg.source == "tfds":
    from ssr_jax.data import records

    return records.open_split(
      data_cfg, split, superpixels=superpixels, clusters=clusters, drop_unlabeled=drop_unlabeled
    )
  if data_cfg.source != "files":
    raise ValueError(f"unknown data.source {data_cfg.source!r}; use one of {SOURCES}")
  return open_folder_split(
    data_cfg, split, superpixels=superpixels, clusters=clusters, drop_unlabeled=drop_unlabeled
  )


def open_folder_split(
  data_cfg, split: str, *, superpixels: bool, clusters: bool, drop_unlabeled: bool = False
):
  """open_split of the folders at data.root, whatever data.source says (the TFDS build's input)."""
  from ssr_jax.data import examples
  from ssr_jax.data import superpixels as sp_lib

  s = get_dataset(data_cfg).split(
    split, drop_unlabeled=drop_unlabeled, workers=data_cfg.num_workers
  )
  store = examples.FileStore(
    s,
    sp_lib.split_paths(data_cfg, s) if superpixels else None,
    sp_lib.cluster_paths(data_cfg, s) if clusters else None,
  )
  return s, store


def class_names(data_cfg) -> tuple[str, ...]:
  """Foreground class names (mask value c+1 for name c) of data.source's dataset."""
  if data_cfg.source == "tfds":
    from ssr_jax.data import records

    return records.class_names(data_cfg)
  return get_dataset(data_cfg).class_names
