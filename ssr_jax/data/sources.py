"""Where a split's examples come from: the dataset registry (registry.py: data.name -> its folder
reader, opened at data.root) and data.source ("files": those folders; "tfds": a TFDS build in
data.tfds_data_dir, records.py); and the config fields a dataset defines (`configure`)."""

from ssr_jax.data import examples, folder, records
from ssr_jax.data import superpixels as sp_lib
from ssr_jax.data.files import DataError
from ssr_jax.data.registry import get_dataset

SOURCES = ("files", "tfds")


def open_split(
  data_cfg, split: str, *, superpixels: bool, clusters: bool = False, drop_unlabeled: bool = False
):
  """(Split, store) of a split from data.source; store.ref(split index) fetches an example.

  superpixels / clusters: whether the maps are read (checked to exist here: a DataError names
  what is missing and the command that makes it).
  """
  if data_cfg.source == "tfds":
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
    return records.class_names(data_cfg)
  return get_dataset(data_cfg).class_names


def dataset_fields(data_cfg) -> dict:
  """What the dataset of data.source says about itself: num_classes, class_names, prompts
  (CLIP names of the classes), bg_names ((): not defined) and max_labels (the most classes one
  image carries; folder datasets and TFDS builds, None for the other folders)."""
  if data_cfg.source == "tfds":
    return records.dataset_fields(data_cfg)
  ds = get_dataset(data_cfg)
  index = folder.index_of(data_cfg) if ds.name == "folder" else None
  return dict(
    num_classes=ds.num_classes,
    class_names=ds.class_names,
    prompts=ds.prompts or ds.class_names,
    bg_names=ds.bg_names,
    max_labels=folder.max_labels(index) if index else None,
  )


def configure(config):
  """config (a copy) with the fields a folder dataset defines filled in: data.num_classes,
  model.class_names (classes.txt's prompts), model.bg_names and model.max_classes, from data.root
  or, with data.source "tfds", from the build's metadata. configs/folder.py leaves them 0 / ();
  a set data.num_classes must agree, a set model.max_classes is kept, and class or background
  names must be empty or the folder's (its files hold them; so configuring twice changes
  nothing). Other datasets: config unchanged.
  """
  if config.data.name != "folder":
    return config
  fields = dataset_fields(config.data)
  own = dict(class_names=tuple(fields["prompts"]), bg_names=tuple(fields["bg_names"]))
  own["bg_names"] = own["bg_names"] or folder.DEFAULT_BG
  for key, value in own.items():  # Set ones must be the folder's (so configure is idempotent).
    if tuple(config.model[key]) not in ((), value):
      raise DataError(
        f"model.{key} is set, but a folder dataset's prompts come from its "
        f"{folder.CLASSES if key == 'class_names' else folder.BACKGROUND}: leave model.{key} "
        "empty, as configs/folder.py does, and edit that file"
      )
  if config.data.num_classes and config.data.num_classes != fields["num_classes"]:
    raise DataError(
      f"data.num_classes is {config.data.num_classes} but the folder dataset has "
      f"{fields['num_classes']} classes (including background); leave it 0 (configs/folder.py)"
    )
  cfg = config.copy_and_resolve_references()
  cfg.data.num_classes = fields["num_classes"]
  cfg.model.class_names, cfg.model.bg_names = own["class_names"], own["bg_names"]
  if cfg.model.max_classes <= 0:
    cfg.model.max_classes = int(fields["max_labels"])
  return cfg
