"""Scan a dataset and report every problem at once (rather than failing on the first).

  python -m ssr_jax.data.check --config configs/voc.py [--splits train_aug,val] [--workers N]

Per split: the list file exists and is non-empty; the files it names exist (when some do not, one
summary: the counts, a few names and the likely cause, e.g. a list of images data.root does not
have; the rest are still checked); every listed image decodes fully (corrupt or
truncated JPEGs are caught here, grayscale/RGBA are fine: they are converted); every mask
exists, is single-channel, has values in 0..C-1 or 255 and the image's size; images without
any foreground label are counted (training skips them); and if the superpixel folder exists,
every superpixel file exists, decodes and has the image's size, and likewise the colour-cluster
files if their folder (data.color_clusters, data.cluster_position_weight) exists. Exit status 1
if anything is wrong.

Training runs the same per-example check at start-up (`verify_split`, from the input pipeline)
over the examples it reads, from the folders or a TFDS build, at data.verify: "headers" (the
default: each file's header gives its size and mode, and its last 4 KiB must hold the JPEG/PNG
end marker, which a truncated file lacks; a suspect file is decoded in full), "full" (every file
decoded, as this command does) or "none".
"""

import concurrent.futures
import dataclasses
import io
import os
import sys

import numpy as np
from etils import epath
from PIL import Image

from ssr_jax.data import dataset, files, folder, sources
from ssr_jax.data import superpixels as sp_lib
from ssr_jax.data.examples import Encoded, FileRef
from ssr_jax.data.files import DataError

LEVELS = ("none", "headers", "full")  # data.verify.
LISTED = 3  # Problems quoted in the start-up error (the check command lists them all).
# End markers of complete files: a truncated JPEG or PNG lacks them. Looked for in the last
# bytes, as some writers append padding or metadata after the marker.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL = 4096


@dataclasses.dataclass
class Report:
  split: str
  total: int = 0
  unlabeled: int = 0
  problems: list = dataclasses.field(default_factory=list)
  superpixel_dir: str = ""  # "" when no superpixel folder exists.
  masks: int = 0  # Images with a mask.
  notes: list = dataclasses.field(default_factory=list)  # Not problems (e.g. ignored files).


def _size(data: bytes, decode, level: str, modes=()) -> tuple[tuple[int, int], np.ndarray | None]:
  """((H, W), the decoded array at level "full", else None) of one encoded file.

  "headers" reads the size and mode from the header and looks for the end marker; a file that
  fails either is decoded in full, so that the DataError says what training would say (and a
  false alarm, e.g. a JPEG with trailing bytes past 4 KiB, passes).
  """
  if level == "full":
    a = decode(data)
    return a.shape[:2], a
  try:
    with Image.open(io.BytesIO(data)) as im:
      hw, mode, fmt = (im.height, im.width), im.mode, im.format
    marker = _END_MARKERS.get(fmt)
    suspect = (modes and mode not in modes) or (marker is not None and marker not in data[-_TAIL:])
  except (OSError, SyntaxError, ValueError):
    suspect = True
  if suspect:
    hw = decode(data).shape[:2]
  return hw, None


def example_problems(enc: Encoded, num_classes: int, *, level: str = "full", num_clusters: int = 0):
  """(problems, float32 [C-1] labels or None) of one example's encoded files.

  level "full" decodes every file as training does (mask values included); "headers" checks
  what the headers and end markers tell (see _size). Either way: each map has its image's
  size; colour-cluster ids are < num_clusters (0: unchecked; at level "full" only).
  """
  names, fix, problems = enc.names, enc.remedy, []
  decoders = (
    lambda d: files.decode_image(d, names[0], fix),
    lambda d: files.decode_mask(d, num_classes, names[1], fix),
    lambda d: files.decode_superpixels(d, names[2], fix),
    lambda d: files.decode_clusters(d, names[3], fix),
  )
  modes = ((), ("L", "P"), (), ("L",))
  sizes, arrays = [None] * 4, [None] * 4
  for i, data in enumerate(enc[:4]):
    if data is not None and (i != 1 or data):  # A mask of b"": none (folder datasets).
      try:
        sizes[i], arrays[i] = _size(data, decoders[i], level, modes[i])
      except DataError as e:
        problems.append(str(e))
  for i in (1, 2, 3):
    if sizes[0] is not None and sizes[i] is not None:
      try:
        files.check_same_size(sizes[i], sizes[0], names[i], names[0])
      except DataError as e:
        problems.append(str(e))
  cl = arrays[3]
  if num_clusters and cl is not None and cl.size and cl.max() >= num_clusters:
    problems.append(f"{names[3]} has id {cl.max()} >= {num_clusters} clusters")
  labels = None if arrays[1] is None else dataset.mask_labels(arrays[1], num_classes)
  return problems, labels


def _ref_problems(ref, num_classes, level, num_clusters):
  try:
    enc = ref.fetch()
  except DataError as e:
    return [str(e)], None
  return example_problems(enc, num_classes, level=level, num_clusters=num_clusters)


def scan(refs, num_classes: int, *, level: str, workers: int, num_clusters: int = 0, bar=None):
  """Yields example_problems of each example reference (FileRef or records.RecordRef), in
  order, checked in `workers` threads (decoding and reads release the GIL)."""
  n = len(refs)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    args = (refs, [num_classes] * n, [level] * n, [num_clusters] * n)
    for out in pool.map(_ref_problems, *args):
      if bar is not None:
        bar.update(1)
      yield out


def verify_split(split, store, *, level: str, workers: int) -> None:
  """The start-up check of the examples training reads (data.verify): one DataError with the
  count of bad files, the first few problems and what to do; nothing at level "none".

  split, store: what sources.open_split returns (folders or a TFDS build).
  """
  if level not in LEVELS:
    raise ValueError(f"data.verify={level!r}: use one of {LEVELS}")
  if level == "none":
    return
  refs = [store.ref(i) for i in range(len(split))]
  problems = [
    p for ps, _ in scan(refs, split.num_classes, level=level, workers=workers) for p in ps
  ]
  if not problems:
    return
  more = f"; and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
  raise DataError(
    f"data.verify={level}: {len(problems)} problem(s) in the {len(split)} examples of split "
    f"{split.name!r}, found before training: {'; '.join(problems[:LISTED])}{more}. Fix or "
    "replace those files (python -m ssr_jax.data.check --config <your config> lists every "
    "problem), or drop their ids from the split list"
  )


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
  # Missing images and masks: one summary, then only the rows that have both are read.
  missing = dataset.missing_files([*sf.images, *sf.masks])
  if missing:
    where = dataset.where(split, sf.list_file)
    report.problems.append(dataset.missing_summary(missing, sf.images, where, ds.manual))
    gone = set(missing)
    keep = [k for k in range(len(sf.ids)) if not {sf.images[k], sf.masks[k]} & gone]
    sf = dataclasses.replace(
      sf,
      ids=[sf.ids[k] for k in keep],
      images=[sf.images[k] for k in keep],
      masks=[sf.masks[k] for k in keep],
    )
    sp_paths, cl_paths = [sp_paths[k] for k in keep], [cl_paths[k] for k in keep]
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=len(sf.ids), desc=f"check {split}", unit="img", file=sys.stderr)
  refs = [FileRef(*paths) for paths in zip(sf.images, sf.masks, sp_paths, cl_paths)]
  labels = []
  workers = workers or os.cpu_count() or 1
  kw = dict(level="full", workers=workers, num_clusters=data_cfg.color_clusters, bar=bar)
  for problems, lab in scan(refs, ds.num_classes, **kw):
    report.problems.extend(problems)
    if lab is not None:
      labels.append(lab)
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
