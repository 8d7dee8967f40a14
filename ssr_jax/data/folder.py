"""Your own dataset: a folder of tagged images (data.name = "folder", configs/folder.py).

Layout of data.root (a spreadsheet's worth of work; `python -m ssr_jax.data.make_folder` writes
it from the synthetic set or a VOC folder):
  images/          JPEG or PNG files, in subfolders if you like.
  labels.csv       A header naming the columns `image`, `labels` and optionally `split` (any
                   order; other columns are ignored), then a row per image: its path relative to
                   images/, its class names separated by ";", and its split (any name: train,
                   val, test, ...). A row with no class names is kept for evaluation and
                   prediction and skipped by training (the count is logged); images that no row
                   names are ignored (the data check counts them).
  classes.txt      The foreground classes in order, one per line: mask value c is line c. A line
                   is `name`, or `name: prompt names` (comma-separated synonyms that CLIP sees
                   instead of the name, e.g. `person: person with clothes,people,human`), or
                   WeCLIP's `person with clothes,people,human` (the first name names the class,
                   the whole line is the prompt). Blank lines and `#` comments are skipped.
  background.txt   Optional: background prompt names for the CAM softmax (§1.2), one per line
                   (commas: synonyms of one prompt). Without it: DEFAULT_BG less any name that
                   is also a class's name or prompt.
  masks/           Optional, evaluation only: class-index PNGs (0 background, c = classes.txt line
                   c, 255 ignore) named like their image with .png (images/a/b.jpg ->
                   masks/a/b.png), on whichever images have them. Images without one read as all
                   255, so they count in no pixel metric.
An image's id is its path under images/ without the extension ("a/b"): it names its
superpixel, prediction and visualisation files.

Splits: the split column; without one, a seeded hold-out of round(data.folder.val_fraction x
N) images is "val" and the rest "train": the images whose sha256 of "<data.folder.split_seed>/
<path>" sorts lowest, so the choice depends only on the paths and the seed (the same on every
run and host, whatever the row order; adding an image moves at most one other across).

The class count, the prompts and model.max_classes (the most classes any row names) come from
here (sources.configure). Opening the dataset checks everything a run needs before it starts,
and raises one DataError listing every problem: unreadable text files, unknown class names
(with the nearest known ones), duplicate rows or ids, missing images or ones whose header does
not read, masks of another size or with values out of range, splits that the config names but
the folder lacks, and classes that no training image carries. `python -m ssr_jax.data.check`
also decodes every pixel.
"""

import concurrent.futures
import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import os

import numpy as np
from etils import epath
from PIL import Image

from ssr_jax.clip.prompts import VOC_BG
from ssr_jax.data import dataset, files
from ssr_jax.data.files import DataError

IMAGES, LABELS, CLASSES, BACKGROUND, MASKS = (
  "images",
  "labels.csv",
  "classes.txt",
  "background.txt",
  "masks",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_SEP = ";"
# General scene names for the CAM's background prompts (WeCLIP's VOC list without its
# VOC-specific distractors "keyboard", "helmet", "sign"): used when background.txt is absent.
DEFAULT_BG = tuple(n for n in VOC_BG if n not in ("keyboard", "helmet", "sign"))
MAX_LISTED = 100  # Problems named in one error (all of them up to this).

MANUAL = f"""\
A folder dataset (data.name=folder) is data.root holding images/ (JPEG/PNG, subfolders allowed),
labels.csv (header image,labels[,split]; class names separated by "{LABEL_SEP}"), classes.txt (one
class per line, optionally "name: prompt synonyms"), and optionally background.txt and masks/
(class-index PNGs, evaluation only). See the README section "Your own data"."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One labels.csv row."""

  line: int
  path: str  # Relative to images/, "/"-separated.
  labels: tuple[int, ...]  # Mask values 1..C-1.
  split: str


@dataclasses.dataclass(frozen=True)
class Index:
  """What the text files say, checked."""

  class_names: tuple[str, ...]
  prompts: tuple[str, ...]
  bg_names: tuple[str, ...]
  rows: tuple[Row, ...]  # labels.csv order.
  has_split_column: bool

  def split_names(self) -> list[str]:
    return list(dict.fromkeys(r.split for r in self.rows))


def image_id(path: str) -> str:
  """a/b.jpg -> a/b."""
  return path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path


def mask_path(root, path: str) -> str:
  return str(epath.Path(root) / MASKS / f"{image_id(path)}.png")


def _lines(path: epath.Path) -> list[tuple[int, str]]:
  """(line number, stripped text) of the non-blank, non-comment lines."""
  text = path.read_text(encoding="utf-8-sig")
  return [
    (n, s.strip()) for n, s in enumerate(text.splitlines(), 1) if s.strip() and s.strip()[0] != "#"
  ]


def parse_class_line(text: str) -> tuple[str, str]:
  """(class name, CLIP prompt) of a classes.txt line (module docstring)."""
  if ":" in text:
    name, prompt = (s.strip() for s in text.split(":", 1))
    return name, ",".join(p.strip() for p in prompt.split(",") if p.strip()) or name
  return text.split(",")[0].strip(), ",".join(p.strip() for p in text.split(",") if p.strip())


def _read_classes(root, problems) -> tuple[tuple[str, ...], tuple[str, ...]]:
  path = epath.Path(root) / CLASSES
  try:
    lines = _lines(path)
  except FileNotFoundError:
    problems.append(f"{path} is missing: list the foreground classes, one per line")
    return (), ()
  names, prompts, seen = [], [], {}
  for n, text in lines:
    name, prompt = parse_class_line(text)
    if not name:
      problems.append(f"{CLASSES} line {n}: no class name in {text!r}")
    elif LABEL_SEP in name:
      problems.append(f"{CLASSES} line {n}: class name {name!r} contains {LABEL_SEP!r}")
    elif name in seen:
      problems.append(f"{CLASSES} line {n}: class {name!r} repeats line {seen[name]}")
    seen.setdefault(name, n)
    names.append(name)
    prompts.append(prompt)
  if not lines:
    problems.append(f"{path} lists no class")
  if len(names) > 254:
    problems.append(f"{path} lists {len(names)} classes; masks hold at most 254 (1..254)")
  return tuple(names), tuple(prompts)


def _read_background(root, names, prompts, problems) -> tuple[str, ...]:
  path = epath.Path(root) / BACKGROUND
  taken = {s.strip().lower() for p in (*names, *prompts) for s in p.split(",")}
  if not path.exists():
    return tuple(b for b in DEFAULT_BG if b not in taken)
  bg = []
  for n, text in _lines(path):
    clash = sorted(taken & {s.strip().lower() for s in text.split(",")})
    if clash:
      problems.append(
        f"{BACKGROUND} line {n}: {', '.join(clash)} is also a class (its name or prompt); a "
        "background prompt must not name a class"
      )
    bg.append(text)
  if not bg:
    problems.append(f"{path} lists no background name (delete it to use the default)")
  return tuple(bg)


def _nearest(name, known) -> str:
  near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
  return f"; nearest: {', '.join(near)}" if near else f"; classes.txt has {', '.join(known[:8])}"


def _read_rows(root, names, prompts, problems) -> tuple[list[Row], bool]:
  path = epath.Path(root) / LABELS
  try:
    text = path.read_text(encoding="utf-8-sig")  # Spreadsheets save a BOM.
  except FileNotFoundError:
    problems.append(f"{path} is missing: a header image,labels[,split] and a row per image")
    return [], False
  reader = csv.reader(io.StringIO(text))
  header = [h.strip().lower() for h in next(reader, [])]
  need = [c for c in ("image", "labels") if c not in header]
  if need:
    problems.append(
      f"{LABELS} line 1: the header {','.join(header) or '(empty)'} has no column "
      f"{' or '.join(need)}; the first line must name the columns, e.g. image,labels,split"
    )
    return [], False
  col = {c: header.index(c) for c in ("image", "labels", "split") if c in header}
  value = {n: c + 1 for c, n in enumerate(names)}
  synonym = {s.strip(): n for n, p in zip(names, prompts) for s in p.split(",") if s.strip()}
  rows, first_line = [], {}
  for cells in reader:
    n = reader.line_num
    if not any(c.strip() for c in cells):
      continue
    cell = {k: cells[c].strip() if c < len(cells) else "" for k, c in col.items()}
    img = cell["image"].replace("\\", "/")
    split = cell.get("split", "")
    where = f"{LABELS} line {n}"
    bad = not img or img.startswith("/") or ".." in img.split("/")
    if bad:
      problems.append(f"{where}: image path {img!r} must be relative to images/ (no '..')")
      continue
    if not img.lower().endswith(IMAGE_SUFFIXES):
      problems.append(f"{where}: {img} is not a .jpg, .jpeg or .png file")
    if img in first_line:
      problems.append(f"{where}: duplicate row for {img} (first on line {first_line[img]})")
      continue
    first_line[img] = n
    if "split" in col and not split:
      problems.append(f"{where}: {img} has an empty split")
    labels = []
    for name in (s.strip() for s in cell["labels"].split(LABEL_SEP)):
      if not name:
        continue
      if name in value:
        labels.append(value[name])
      elif name in synonym:
        problems.append(
          f"{where}: {name!r} is a prompt of class {synonym[name]!r}; label it {synonym[name]!r}"
        )
      else:
        problems.append(f"{where}: unknown class {name!r}{_nearest(name, list(names))}")
    rows.append(Row(n, img, tuple(sorted(set(labels))), split))
  ids = {}
  for r in rows:
    i = image_id(r.path)
    if i in ids:
      problems.append(
        f"{LABELS} lines {ids[i].line} and {r.line}: {ids[i].path} and {r.path} share the id "
        f"{i!r} (paths without extension must differ)"
      )
    ids.setdefault(i, r)
  return rows, "split" in col


def holdout(paths, fraction: float, seed: int) -> set[str]:
  """The paths held out for validation: round(fraction * N) of them (at least one when
  fraction > 0 and N > 1, never all), those whose sha256 of "<seed>/<path>" sorts lowest."""
  n = len(paths)
  k = int(round(fraction * n))
  if fraction > 0 and n > 1:
    k = min(max(k, 1), n - 1)
  key = lambda p: hashlib.sha256(f"{seed}/{p}".encode()).hexdigest()  # noqa: E731
  return set(sorted(paths, key=key)[:k])


def read_index(root: str, *, val_fraction: float, split_seed: int) -> tuple[Index, list[str]]:
  """(Index, problems) of the text files of the folder at root (no image is opened)."""
  problems = []
  names, prompts = _read_classes(root, problems)
  bg = _read_background(root, names, prompts, problems)
  rows, has_split = _read_rows(root, names, prompts, problems)
  if rows and not has_split:
    if not 0 <= val_fraction < 1:
      problems.append(f"data.folder.val_fraction={val_fraction} must be in [0, 1)")
    held = holdout([r.path for r in rows], val_fraction, split_seed)
    rows = [dataclasses.replace(r, split="val" if r.path in held else "train") for r in rows]
  if not rows and not any(LABELS in p for p in problems):
    problems.append(f"{LABELS} has no row")
  return Index(names, prompts, bg, tuple(rows), has_split), problems


def _check_files(root, row: Row, num_classes: int) -> tuple[bool, list[str]]:
  """(has a mask, problems) of one row's image (header) and mask (all of it)."""
  top = epath.Path(root)
  image = top / IMAGES / row.path
  where = f"{LABELS} line {row.line}"
  try:
    with image.open("rb") as f, Image.open(f) as im:
      hw = im.size[::-1]
      fmt = im.format
  except FileNotFoundError:
    return False, [f"{where}: image not found: {image}"]
  except (OSError, SyntaxError) as e:
    return False, [f"{where}: cannot read image {image} ({e})"]
  problems = []
  if fmt not in ("JPEG", "PNG"):
    problems.append(f"{where}: {image} is {fmt}, not JPEG or PNG")
  mpath = epath.Path(mask_path(root, row.path))
  if not mpath.is_file():
    return False, problems
  try:
    m = files.decode_mask(files.read_bytes(mpath), 256, f"mask {mpath}")
  except DataError as e:
    return True, [*problems, str(e)]
  if m.shape != tuple(hw):
    problems.append(
      f"mask {mpath} is {m.shape[0]}x{m.shape[1]} but its image is {hw[0]}x{hw[1]} (H x W)"
    )
  bad = (m >= num_classes) & (m != files.IGNORE)
  if bad.any():
    vals = sorted(np.unique(m[bad]).tolist())[:10]
    problems.append(
      f"mask {mpath} has values {vals} outside 0..{num_classes - 1} ({CLASSES} has "
      f"{num_classes - 1} classes) and 255"
    )
  return True, problems


def scan(root: str, *, val_fraction: float, split_seed: int, splits=(), train_split: str = ""):
  """(Index, has_mask per row, problems): the text files and every listed image and mask.

  splits: split names the config uses (each must exist); train_split: every class must label
  one of its images.
  """
  index, problems = read_index(root, val_fraction=val_fraction, split_seed=split_seed)
  num_classes = len(index.class_names) + 1
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # gs:// checks are round trips.
    checked = list(pool.map(lambda r: _check_files(root, r, num_classes), index.rows))
  for _, p in checked:
    problems.extend(p)
  have = index.split_names()
  for s in dict.fromkeys(splits):
    if index.rows and s not in have:
      how = "the split column" if index.has_split_column else "the hold-out (train, val)"
      problems.append(f"split {s!r} named by the config is not in {how}; it has {', '.join(have)}")
  if train_split in have:
    seen = {v for r in index.rows if r.split == train_split for v in r.labels}
    held = "" if index.has_split_column else " (or the hold-out took them: data.folder.split_seed)"
    for c, name in enumerate(index.class_names, 1):
      if c not in seen:
        problems.append(
          f"class {name!r} (class {c} of {CLASSES}) labels no image of the training split "
          f"{train_split!r}{held}: tag images with it or remove it"
        )
  return index, tuple(m for m, _ in checked), problems


def _raise(root, problems):
  listed = "\n  ".join(problems[:MAX_LISTED])
  more = len(problems) - MAX_LISTED
  more = f"\n  ... and {more} more" if more > 0 else ""
  raise DataError(
    f"the folder dataset at {root} has {len(problems)} problem(s); nothing was run or written. "
    f"Fix them all and rerun:\n  {listed}{more}\n{MANUAL}"
  )


def _stamp(root) -> tuple:
  """What makes a cached scan stale: the text files' size and mtime."""
  out = []
  for name in (LABELS, CLASSES, BACKGROUND):
    path = epath.Path(root) / name
    try:
      if "://" in str(path):
        st = path.stat()
        out.append((st.length, st.mtime))
      else:  # Nanoseconds: a rewrite within the same second is seen.
        st = os.stat(path)
        out.append((st.st_size, st.st_mtime_ns))
    except OSError:
      out.append(None)
  return tuple(out)


@functools.lru_cache(maxsize=8)
def _open(root, val_fraction, split_seed, splits, train_split, stamp) -> dataset.Dataset:
  del stamp  # Part of the cache key only.
  if not root or not epath.Path(root).is_dir():
    raise DataError(f"data.root={root!r} is not a folder.\n{MANUAL}")
  index, has_mask, problems = scan(
    root, val_fraction=val_fraction, split_seed=split_seed, splits=splits, train_split=train_split
  )
  if problems:
    _raise(root, problems)
  num_classes = len(index.class_names) + 1
  top = epath.Path(root)

  def resolve(split):
    picked = [(r, m) for r, m in zip(index.rows, has_mask) if r.split == split]
    if not picked:
      raise DataError(
        f"the folder dataset at {root} has no split {split!r}; it has "
        f"{', '.join(index.split_names())}"
      )
    rows = [r for r, _ in picked]
    return dataset.SplitFiles(
      ids=[image_id(r.path) for r in rows],
      images=[str(top / IMAGES / r.path) for r in rows],
      masks=[mask_path(root, r.path) if m else "" for r, m in picked],
      list_file=str(top / LABELS),
      labels=dataset.labels_from_values([r.labels for r in rows], num_classes),
    )

  return dataset.Dataset(
    name="folder",
    root=root,
    num_classes=num_classes,
    class_names=index.class_names,
    manual=MANUAL,
    resolve=resolve,
    bg_names=index.bg_names,
    prompts=index.prompts,
  )


def open_dataset(
  root: str,
  *,
  val_fraction: float = 0.1,
  split_seed: int = 0,
  splits=(),
  train_split: str = "",
) -> dataset.Dataset:
  """The folder dataset at root, checked (module docstring); DataError listing every problem.

  The scan is cached per process until labels.csv, classes.txt or background.txt changes.
  """
  args = (str(root), float(val_fraction), int(split_seed), tuple(splits), train_split)
  return _open(*args, _stamp(root) if root else ())


def _plain_split(split: str) -> bool:
  return bool(split) and "/" not in split and not split.endswith(".txt")


def index_of(data_cfg) -> Index:
  """The Index of data.root's text files (no image opened; the problems are open_dataset's)."""
  return read_index(
    data_cfg.root, val_fraction=data_cfg.folder.val_fraction, split_seed=data_cfg.folder.split_seed
  )[0]


def from_config(data_cfg) -> dataset.Dataset:
  """open_dataset of data.root with the data config's splits and hold-out settings."""
  if data_cfg.labels_file:
    raise DataError(
      f"data.labels_file={data_cfg.labels_file!r}: a folder dataset's labels are its "
      f"{LABELS}; leave data.labels_file empty"
    )
  splits = tuple(s for s in (data_cfg.train_split, data_cfg.val_split) if _plain_split(s))
  return open_dataset(
    data_cfg.root,
    val_fraction=data_cfg.folder.val_fraction,
    split_seed=data_cfg.folder.split_seed,
    splits=splits,
    train_split=data_cfg.train_split,
  )


def max_labels(index: Index) -> int:
  """The most classes one image carries (at least 1): model.max_classes of the dataset."""
  return max([1, *(len(r.labels) for r in index.rows)])


def unlisted_images(root: str, index: Index) -> list[str]:
  """Image files under images/ that no labels.csv row names (ignored; the check counts them)."""
  listed = {r.path for r in index.rows}
  out, todo = [], [(epath.Path(root) / IMAGES, "")]
  while todo:  # iterdir, not rglob: epath refuses "**" (a GCS request storm).
    d, rel = todo.pop()
    for p in d.iterdir():
      if p.is_dir():
        todo.append((p, f"{rel}{p.name}/"))
      elif p.suffix.lower() in IMAGE_SUFFIXES and f"{rel}{p.name}" not in listed:
        out.append(str(p))
  return sorted(out)
