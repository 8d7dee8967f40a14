"""Scan a dataset and report every problem at once (rather than failing on the first).

  python -m ssr_jax.data.check --config configs/voc.py [--splits train_aug,val] [--workers N]

Per split: the list file exists and is non-empty; every listed image decodes fully (corrupt or
truncated JPEGs are caught here, grayscale/RGBA are fine: they are converted); every mask
exists, is single-channel, has values in 0..C-1 or 255 and the image's size; images without
any foreground label are counted (training skips them); and if the superpixel folder exists,
every superpixel file exists, decodes and has the image's size, and likewise the colour-cluster
files if their folder (data.color_clusters, data.cluster_position_weight) exists. Exit status 1
if anything is wrong.
"""

import concurrent.futures
import dataclasses
import os
import sys

import numpy as np
from etils import epath

from ssr_jax.data import dataset, files, folder, sources
from ssr_jax.data import superpixels as sp_lib
from ssr_jax.data.files import DataError


@dataclasses.dataclass
class Report:
  split: str
  total: int = 0
  unlabeled: int = 0
  problems: list = dataclasses.field(default_factory=list)
  superpixel_dir: str = ""  # "" when no superpixel folder exists.
  masks: int = 0  # Images with a mask.
  notes: list = dataclasses.field(default_factory=list)  # Not problems (e.g. ignored files).


def _check_one(image_path, mask_path, sp_path, cl_path, num_classes, num_clusters):
  problems, labels = [], None
  image = mask = None
  try:
    image = files.read_image(image_path)
  except DataError as e:
    problems.append(str(e))
  try:
    if mask_path:  # "" = no mask (folder datasets).
      mask = files.read_mask(mask_path, num_classes)
      labels = dataset.mask_labels(mask, num_classes)
  except DataError as e:
    problems.append(str(e))
  if image is not None and mask is not None and mask.shape != image.shape[:2]:
    problems.append(
      f"mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but image {image_path} is "
      f"{image.shape[0]}x{image.shape[1]}"
    )
  if sp_path is not None:
    try:
      sp = files.read_superpixels(sp_path)
      if image is not None and sp.shape != image.shape[:2]:
        problems.append(f"superpixels {sp_path} are {sp.shape} but image is {image.shape[:2]}")
    except DataError as e:
      problems.append(str(e))
  if cl_path is not None:
    try:
      cl = files.read_clusters(cl_path)
      if image is not None and cl.shape != image.shape[:2]:
        problems.append(f"clusters {cl_path} are {cl.shape} but image is {image.shape[:2]}")
      elif cl.size and cl.max() >= num_clusters:
        problems.append(f"clusters {cl_path} have id {cl.max()} >= {num_clusters} clusters")
    except DataError as e:
      problems.append(str(e))
  return problems, labels


def check_split(data_cfg, split: str, *, workers: int = 0, progress: bool = False) -> Report:
  """Scans one split; returns a Report listing every problem found."""
  report = Report(split)
  ds = sources.get_dataset(data_cfg)
  try:
    sf = ds.resolve(split)
  except DataError as e:
    report.problems.append(str(e))
    return report
  report.total = len(sf.ids)
  report.masks = sum(1 for m in sf.masks if m)
  if ds.name == "folder":
    extra = folder.unlisted_images(ds.root, folder.index_of(data_cfg))
    if extra:
      report.notes.append(
        f"{len(extra)} image(s) under images/ have no row in {folder.LABELS} and are ignored, "
        f"e.g. {extra[0]}"
      )
  if not sf.ids:
    report.problems.append(f"split {split!r} is empty ({sf.list_file})")
    return report
  sp_dir = sp_lib.directory(data_cfg, ds.root)
  sp_paths = cl_paths = [None] * len(sf.ids)
  if epath.Path(sp_dir).is_dir():
    report.superpixel_dir = sp_dir
    sp_paths = [str(epath.Path(sp_dir) / f"{i}.png") for i in sf.ids]
    cl_dir = sp_lib.cluster_directory(data_cfg, ds.root)
    if epath.Path(cl_dir).is_dir():
      cl_paths = [str(epath.Path(cl_dir) / f"{i}.png") for i in sf.ids]
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=len(sf.ids), desc=f"check {split}", unit="img", file=sys.stderr)
  labels = []
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    n = len(sf.ids)
    args = (sf.images, sf.masks, sp_paths, cl_paths, [ds.num_classes] * n)
    args += ([data_cfg.color_clusters] * n,)
    for problems, lab in pool.map(_check_one, *args):
      report.problems.extend(problems)
      if lab is not None:
        labels.append(lab)
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  if sf.labels_file:
    try:
      dataset.read_labels_file(sf.labels_file, sf.ids, ds.num_classes)
    except DataError as e:
      report.problems.append(str(e))
  if report.superpixel_dir and any(sp_dir in p for p in report.problems):
    report.problems.append(
      f"recompute bad superpixel files with: {sp_lib.command(data_cfg, split)}"
    )
  if sf.labels is not None:  # Given by the reader (folder): what training reads.
    labels = list(sf.labels)
  report.unlabeled = int(sum(1 for lab in labels if not np.any(lab)))
  return report


def main(argv):
  from absl import flags

  del argv
  cfg = flags.FLAGS.config
  splits = (
    flags.FLAGS.splits.split(",")
    if flags.FLAGS.splits
    else [cfg.data.train_split, cfg.data.val_split]
  )
  bad = 0
  for split in splits:
    try:
      r = check_split(cfg.data, split.strip(), workers=flags.FLAGS.workers, progress=True)
    except DataError as e:
      raise SystemExit(f"error: {e}") from None
    sp = f", superpixels in {r.superpixel_dir}" if r.superpixel_dir else ", no superpixel folder"
    print(
      f"{split}: {r.total} images, {r.masks} with masks, {r.unlabeled} without a foreground label "
      f"(skipped by training){sp}, {len(r.problems)} problem(s)"
    )
    for note in r.notes:
      print(f"  note: {note}")
    for p in r.problems:
      print(f"  {p}")
    bad += len(r.problems)
  if bad:
    raise SystemExit(1)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
  flags.DEFINE_string("splits", "", "Comma-separated splits (default: train and val splits).")
  flags.DEFINE_integer("workers", 0, "Threads (0 = all cores).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
