"""The dataset registry: data.name -> the reader that opens its folders at data.root.

Readers (voc, coco, synthetic, folder) import only dataset.py and files.py; nothing they import
imports this module back, so the data layer's import graph stays acyclic
(tests/data/test_import_graph.py checks it).
"""

from ssr_jax.data import coco, folder, synthetic, voc
from ssr_jax.data.dataset import Dataset
from ssr_jax.data.files import DataError

READERS = {
  "voc": lambda d: voc.open_dataset(d.root, labels_file=d.labels_file),
  "coco": lambda d: coco.open_dataset(d.root, labels_file=d.labels_file),
  "synthetic": lambda d: synthetic.open_dataset(d.root, labels_file=d.labels_file),
  "folder": folder.from_config,
}


def get_dataset(data_cfg) -> Dataset:
  """The dataset named by data.name at data.root; its class count must match data.num_classes
  (0 = take the dataset's, as configs/folder.py does)."""
  if data_cfg.name not in READERS:
    raise ValueError(f"unknown data.name {data_cfg.name!r}; use one of {sorted(READERS)}")
  ds = READERS[data_cfg.name](data_cfg)
  if data_cfg.num_classes and ds.num_classes != data_cfg.num_classes:
    raise DataError(
      f"data.num_classes is {data_cfg.num_classes} but the {ds.name} dataset at {ds.root} "
      f"has {ds.num_classes} classes (including background); fix the config"
    )
  return ds
