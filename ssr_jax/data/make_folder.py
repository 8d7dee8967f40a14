"""Convert the synthetic dataset or a VOC folder into the folder layout (folder.py).

  python -m ssr_jax.data.make_folder --from synthetic --src DATA --out FOLDER
  python -m ssr_jax.data.make_folder --from voc --src VOCdevkit/VOC2012 --out FOLDER \\
      [--splits train_aug,val] [--masks all|none|SPLIT,...]

Images and masks are copied byte for byte (images/<id>.<ext>, masks/<id>.png), labels.csv gets
a row per image in split-list order (its labels, its split), classes.txt the classes with their
CLIP prompts ("bird: bird avian" where the prompt differs from the name), background.txt the
dataset's background prompts. So the folder source reads exactly the arrays the original reader
does (tests/data/test_folder.py checks batches bit for bit). --masks none (or a list of splits)
leaves masks out, as for tagged images without any. The folder is written under <out>.partial
and renamed when complete; an existing <out> is refused.
"""

import argparse
import concurrent.futures
import csv
import io
import os
import shutil
import sys

from etils import epath

from ssr_jax.data import dataset, files, folder, synthetic, voc
from ssr_jax.data.files import DataError

SOURCES = ("synthetic", "voc")


def _source(kind: str, src: str) -> tuple[dataset.Dataset, tuple[str, ...], tuple[str, ...]]:
  """(dataset, CLIP prompts of its classes, background prompts)."""
  if kind == "synthetic":
    ds = synthetic.open_dataset(src)
    return ds, ds.class_names, ds.bg_names
  if kind == "voc":
    from ssr_jax.clip.prompts import VOC_BG, VOC_FG  # Late: it imports jax (seconds).

    return voc.open_dataset(src), VOC_FG, VOC_BG
  raise DataError(f"--from {kind!r}: use one of {SOURCES}")


def class_lines(names, prompts) -> list[str]:
  """classes.txt lines: the name, with ": prompt" where CLIP's prompt differs from it."""
  return [n if p == n else f"{n}: {p}" for n, p in zip(names, prompts)]


def convert(kind: str, src: str, out: str, splits, *, masks: str = "all", workers: int = 8) -> dict:
  """Writes the folder dataset at out; returns {split: number of images}.

  splits: split names of the source, or (VOC) paths to list files, each named by its stem.
  masks: "all", "none" or comma-separated splits whose masks are copied.
  """
  if epath.Path(out).exists():
    raise DataError(f"--out {out} exists; give a new folder")
  ds, prompts, bg = _source(kind, src)
  names = [epath.Path(s).stem if s.endswith(".txt") else s for s in splits]
  keep = set(names) if masks == "all" else set() if masks == "none" else set(masks.split(","))
  unknown = keep - set(names)
  if unknown:
    raise DataError(f"--masks names {sorted(unknown)}, which are not in --splits {splits}")
  rows, copies, seen = [], [], {}
  for split_arg in splits:
    s = ds.split(split_arg)
    split = epath.Path(split_arg).stem if split_arg.endswith(".txt") else split_arg  # A list.
    for i, img, m, lab in zip(s.ids, s.image_paths, s.mask_paths, s.labels):
      if i in seen:
        raise DataError(f"image {i} is in splits {seen[i]} and {split}; convert disjoint splits")
      seen[i] = split
      rel = f"{i}{os.path.splitext(img)[1].lower()}"
      tags = [ds.class_names[v - 1] for v in dataset.label_values(lab[None])[0]]
      rows.append([rel, folder.LABEL_SEP.join(tags), split])
      copies.append((img, f"{folder.IMAGES}/{rel}"))
      if split in keep:
        copies.append((m, f"{folder.MASKS}/{i}.png"))
  tmp = epath.Path(f"{out}.partial")
  if tmp.exists():
    shutil.rmtree(tmp) if "://" not in str(tmp) else tmp.rmtree()
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    list(pool.map(lambda c: files.write_bytes(tmp / c[1], files.read_bytes(c[0])), copies))
  text = io.StringIO()
  csv.writer(text, lineterminator="\n").writerows([["image", "labels", "split"], *rows])
  files.write_bytes(tmp / folder.LABELS, text.getvalue().encode())
  lines = class_lines(ds.class_names, prompts)
  files.write_bytes(tmp / folder.CLASSES, "".join(f"{x}\n" for x in lines).encode())
  files.write_bytes(tmp / folder.BACKGROUND, "".join(f"{b}\n" for b in bg).encode())
  tmp.rename(out)  # Complete: published under its name.
  return {s: sum(1 for r in rows if r[2] == s) for s in names}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--from", dest="kind", required=True, choices=SOURCES)
  p.add_argument("--src", required=True, help="the dataset folder (data.root of its config)")
  p.add_argument("--out", required=True, help="the folder dataset to write (must not exist)")
  p.add_argument("--splits", default="", help="default: train,val (synthetic), train_aug,val (voc)")
  p.add_argument("--masks", default="all", help="all, none, or the splits whose masks to copy")
  a = p.parse_args(argv)
  splits = (
    a.splits.split(",") if a.splits else ["train" if a.kind == "synthetic" else "train_aug", "val"]
  )
  try:
    counts = convert(a.kind, a.src, a.out, splits, masks=a.masks)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {a.out}: " + ", ".join(f"{s} {n} images" for s, n in counts.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
