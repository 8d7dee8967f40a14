"""The dataset registry: data.name -> its reader (voc, coco, synthetic), opened at data.root."""

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
