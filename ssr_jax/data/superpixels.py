"""Superpixels for SGC (§3.1): computation, offline precompute CLI, start-up check.

SLIC per §3.1: n_segments = data.n_segments per 320x320 of image area (so superpixels keep the
same size, ~32x32 px, whatever the image size), compactness 10, sigma 1, on RGB converted to
Lab, labels 0..S-1. Backends with the same interface:
- "skimage": `skimage.segmentation.slic` (the reference; ~125 ms on 500x375, one core).
- "opencv": OpenCV ximgproc SLIC (opencv-contrib-python-headless, pinned in requirements.txt)
  on the same Gaussian-smoothed Lab image, region size sqrt(area / n), ruler = compactness,
  data.slic_iterations iterations, connectivity enforced; similar (not identical) segments.
data.superpixel_scale = s > 1 runs SLIC at 1/s resolution: the image block-averaged over s x s
pixels (area interpolation; partial blocks at the border repeat the last row/column), smoothed
by sigma / s, the same segment count, then the labels upscaled by nearest (pixel (y, x) takes
low-resolution label (y // s, x // s)); superpixels of ~32x32 px lose little at half resolution.
With the "opencv" backend at s > 1, one float32 Lab image of the full-resolution image
(`opencv_lab`, OpenCV's conversion, within ~0.5 of skimage's rgb2lab) is block-averaged for SLIC
and also gives the clusters' mean colours, instead of converting twice. data.slic_iterations:
skimage's max_num_iter / OpenCV's iterate() (10 = skimage's default).
Measured on 16 synthetic 500x375 images (`python -m benchmarks superpixels`, 2-core Intel Xeon
with AVX-512): skimage 116 ms SLIC + 15 ms clusters per image, ASA 98.79% with 151 superpixels
for 183 requested, cluster ASA 98.25%; opencv at scale 2, 5 iterations (the configs/base.py
default) 11.5 + 4.0 ms, ASA 99.38% (205 superpixels), cluster ASA 98.51%, and still 99.19% /
98.87% at a lower count (n_segments 75: 138 superpixels); the precompute CLI end to end 27 ms
CPU per image, 72 images/s with its 2 worker processes.

Colour clusters, SGC's target regions C = K-means(SLIC(I)) (§3.2, [inferred] settings of §6
#10): per image, K-means over its superpixels on their mean CIE Lab colour (D65, as skimage's
rgb2lab, or the shared OpenCV Lab above; L 0..100, a/b about +-100), optionally with their
mean (y, x) position scaled to [0, 1] and multiplied by data.cluster_position_weight (so the
weight is in Lab units per image side; 0 = colour only), each superpixel weighted by its pixel
count. K = data.color_clusters. Initialisation is deterministic farthest-point (maximin): the
largest superpixel first, then repeatedly the superpixel farthest from the chosen centres
(lowest id on ties), so the result is a pure function of (image, superpixels) with no random
seed; then Lloyd iterations until the assignment stops changing. A cluster is a colour class,
not necessarily connected. Images with fewer than K distinct superpixel colours get fewer
clusters; ids are always 0..K'-1. About 14 ms on a 500x375 image with its own Lab conversion
(`rgb_to_lab`, ~9 ms of it), ~5 ms given the shared OpenCV Lab.

Maps are stored once per image at original resolution, superpixels as lossless uint16 PNG under
`<root>/Superpixels_<backend>_<n_segments>[_s<scale>][_i<iterations>]/<id>.png` (suffixes only
where the setting is not 1 / 10; or data.superpixel_dir), colour clusters as uint8 PNG beside
them in `<that folder>/clusters_k<K>[_p<weight>]/<id>.png` (the folder name records the
clustering settings, so several coexist); both go through the same rescale/flip/pad/crop as the
image (nearest, pad -1) in the input pipeline.

CLI: python -m ssr_jax.data.superpixels --config configs/voc.py [--split train_aug] [--verify]
     [--workers N]      (any --config.data.* override works, e.g. --config.data.root=...)
Parallel over processes (default: one per usable core, each with OpenCV single-threaded),
progress bar, resumable: valid existing files are skipped, so on a folder made before colour
clusters existed it only adds the clusters (from the stored superpixels); a rewritten superpixel
file gets its clusters rewritten too, and clusters that do not follow their stored superpixels
(stale) are remade.
--verify only checks that every superpixel and cluster file exists, decodes and matches its
image's size (clusters: ids below K, constant on each stored superpixel), and lists problems.
"""

import sys
from typing import NamedTuple

import numpy as np
from etils import epath

from ssr_jax.data import dataset, files, parallel, registry
from ssr_jax.data.dataset import Split
from ssr_jax.data.files import DataError

BACKENDS = ("skimage", "opencv")
REFERENCE_AREA = 320 * 320  # n_segments is given per 320x320 crop (§3.1).
ITERATIONS = 10  # SLIC iterations of the reference (skimage's max_num_iter default).


def num_segments(height: int, width: int, n_segments: int) -> int:
  """Segments for an image of this size, keeping the superpixel area of §3.1."""
  return max(1, int(round(n_segments * height * width / REFERENCE_AREA)))


def shares_lab(backend: str, scale: int) -> bool:
  """Whether one OpenCV Lab image serves both SLIC and the colour clusters (module docstring:
  the "opencv" backend at data.superpixel_scale > 1)."""
  return backend == "opencv" and int(scale) > 1


def opencv_lab(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] RGB -> float32 [H, W, 3] CIE Lab by OpenCV (D65; within ~0.5 of
  skimage's rgb2lab, about 1.5 ms on 500x375 against ~10 ms for `rgb_to_lab`)."""
  import cv2

  return cv2.cvtColor(image.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2Lab)


def downscale(x: np.ndarray, scale: int) -> np.ndarray:
  """Block mean over scale x scale pixels of float32 [H, W, C] -> [ceil(H/s), ceil(W/s), C];
  the last row/column is repeated to fill partial blocks (area interpolation at an integer
  ratio)."""
  h, w = x.shape[:2]
  hs, ws = -(-h // scale), -(-w // scale)
  x = np.pad(x, ((0, hs * scale - h), (0, ws * scale - w), (0, 0)), mode="edge")
  try:
    import cv2

    return cv2.resize(x, (ws, hs), interpolation=cv2.INTER_AREA).reshape(hs, ws, -1)
  except ImportError:
    return x.reshape(hs, scale, ws, scale, -1).mean((1, 3), dtype=np.float32)


def upscale(labels: np.ndarray, scale: int, height: int, width: int) -> np.ndarray:
  """Nearest upscaling of labels [ceil(H/s), ceil(W/s)] back to [H, W]: pixel (y, x) takes
  labels[y // s, x // s]."""
  return labels[(np.arange(height) // scale)[:, None], np.arange(width) // scale]


def compute(
  image: np.ndarray,
  *,
  backend: str = "skimage",
  n_segments: int = 100,
  compactness: float = 10.0,
  sigma: float = 1.0,
  scale: int = 1,
  iterations: int = ITERATIONS,
  lab: np.ndarray | None = None,
) -> np.ndarray:
  """SLIC superpixels of uint8 [H, W, 3] RGB -> int32 [H, W] labels 0..S-1 (consecutive).

  n_segments is per 320x320 of area (scaled to the image, §3.1). scale > 1 runs SLIC on the
  image block-averaged by scale (sigma / scale, the same segment count) and upscales the labels
  by nearest. lab: `opencv_lab(image)` when the caller has it already (used only where
  `shares_lab(backend, scale)`).
  """
  h, w = image.shape[:2]
  n = num_segments(h, w, n_segments)
  scale = int(scale)
  if scale < 1:
    raise ValueError(f"data.superpixel_scale must be an integer >= 1, got {scale}")
  if backend == "skimage":
    from skimage.segmentation import slic

    x = image if scale == 1 else downscale(image.astype(np.float32) / 255.0, scale)
    labels = slic(
      x,
      n_segments=n,
      compactness=compactness,
      sigma=sigma / scale,
      max_num_iter=iterations,
      start_label=0,
      channel_axis=-1,
    )
  elif backend == "opencv":
    if scale == 1:
      labels = _opencv_slic(image, n, compactness, sigma, iterations)
    else:
      _ximgproc()  # The clear error before opencv_lab needs cv2.
      lab = opencv_lab(image) if lab is None else lab
      labels = _opencv_slic_lab(lab, n, compactness, sigma, scale, iterations)
  else:
    raise ValueError(f"unknown superpixel backend {backend!r}; use one of {BACKENDS}")
  # Consecutive ids from 0 whatever the backend returns (SGC one-hots ids below S_max); at a
  # reduced scale before upscaling, which keeps every low-resolution pixel.
  labels = np.asarray(labels, np.int64)
  labels -= labels.min()
  present = np.bincount(labels.ravel()) > 0
  labels = (np.cumsum(present) - 1).astype(np.int32)[labels]
  return labels if scale == 1 else upscale(labels, scale, h, w)


def _ximgproc():
  try:
    import cv2

    return cv2.ximgproc
  except (ImportError, AttributeError):
    raise RuntimeError(
      "superpixel backend 'opencv' needs OpenCV's contrib modules: pip install "
      "opencv-contrib-python-headless==5.0.0.93 (or use data.superpixel_backend=skimage)"
    ) from None


def _opencv_slic(image, n, compactness, sigma, iterations):
  """Full resolution: the RGB image smoothed, then converted to Lab (as skimage)."""
  import cv2

  ximgproc = _ximgproc()
  x = image.astype(np.float32) / 255.0
  if sigma > 0:
    x = cv2.GaussianBlur(x, (0, 0), sigma)  # skimage smooths before SLIC too.
  lab = cv2.cvtColor(x, cv2.COLOR_RGB2Lab)  # L 0..100, a/b ~+-127, as skimage's rgb2lab.
  return _opencv_run(ximgproc, lab, n, compactness, iterations, image.shape[:2])


def _opencv_slic_lab(lab, n, compactness, sigma, scale, iterations):
  """Reduced scale: the (shared) Lab image block-averaged, then smoothed by sigma / scale."""
  import cv2

  ximgproc = _ximgproc()
  x = downscale(np.asarray(lab, np.float32), scale)
  if sigma > 0:
    x = cv2.GaussianBlur(x, (0, 0), sigma / scale)
  return _opencv_run(ximgproc, x, n, compactness, iterations, x.shape[:2])


def _opencv_run(ximgproc, lab, n, compactness, iterations, hw):
  region = max(2, int(round(np.sqrt(hw[0] * hw[1] / n))))
  sp = ximgproc.createSuperpixelSLIC(
    lab, algorithm=ximgproc.SLIC, region_size=region, ruler=float(compactness)
  )
  sp.iterate(int(iterations))
  sp.enforceLabelConnectivity(25)
  return sp.getLabels()


# ------------------------------------------------------------------------- colour clusters

# sRGB (D65) -> XYZ and the D65 white point, as skimage.color.rgb2lab (2-degree observer).
_RGB_TO_XYZ = np.array(
  [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] sRGB -> float64 [..., 3] CIE Lab (D65), the formulas of skimage's rgb2lab.

  Own numpy code rather than skimage's so the clustering needs nothing beyond numpy; the sRGB
  decoding is a 256-entry table since inputs are uint8, and the 3x3 product is written out as
  multiply-adds (no BLAS: no thread pools in the worker processes, same bits on every machine).
  """
  c = np.arange(256) / 255.0
  lut = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
  lin = [lut[image[..., j]] for j in range(3)]
  m = _RGB_TO_XYZ / _WHITE_D65[:, None]
  xyz = np.stack([lin[0] * m[i, 0] + lin[1] * m[i, 1] + lin[2] * m[i, 2] for i in range(3)], -1)
  f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
  lab = np.empty(f.shape, np.float64)
  lab[..., 0] = 116.0 * f[..., 1] - 16.0
  lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
  lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
  return lab


def kmeans(points: np.ndarray, weights: np.ndarray, k: int, *, max_iters: int = 100):
  """Weighted K-means with deterministic farthest-point initialisation.

  points: float64 [S, D]; weights: [S] > 0 (pixel counts). First centre: the heaviest point;
  then the point farthest (squared Euclidean) from every chosen centre, lowest index on ties;
  fewer than k centres when fewer than k distinct points exist. Lloyd iterations (weighted
  means; an emptied cluster keeps its centre) until the assignment repeats or max_iters.
  Returns int64 [S] cluster ids, consecutive from 0 in order of their initial centres.
  """
  s = points.shape[0]
  centres = [int(np.argmax(weights))]
  dist = np.sum((points - points[centres[0]]) ** 2, axis=1)
  while len(centres) < min(k, s):
    far = int(np.argmax(dist))
    if dist[far] <= 0.0:  # Every point coincides with a centre: fewer distinct colours than k.
      break
    centres.append(far)
    dist = np.minimum(dist, np.sum((points - points[far]) ** 2, axis=1))
  c = points[centres]
  assign = None
  for _ in range(max_iters):
    d = np.sum((points[:, None, :] - c[None, :, :]) ** 2, axis=-1)  # [S, k']
    new = np.argmin(d, axis=1)
    if assign is not None and np.array_equal(new, assign):
      break
    assign = new
    mass = np.bincount(assign, weights, minlength=len(c))
    sums = np.stack(
      [np.bincount(assign, weights * points[:, j], minlength=len(c)) for j in range(c.shape[1])],
      axis=1,
    )
    c = np.where(mass[:, None] > 0, sums / np.maximum(mass, 1e-300)[:, None], c)
  return np.unique(assign, return_inverse=True)[1].reshape(-1)  # Drop emptied ids.


def color_clusters(
  image: np.ndarray,
  superpixels: np.ndarray,
  *,
  num_clusters: int = 8,
  position_weight=0.0,
  lab: np.ndarray | None = None,
) -> np.ndarray:
  """K-means colour clusters of superpixels (module docstring): C = K-means(SLIC(I)), §3.2.

  image: uint8 [H, W, 3] RGB; superpixels: int [H, W] ids 0..S-1 (from `compute`); lab: the
  image's [H, W, 3] Lab if already computed (e.g. `opencv_lab`), else `rgb_to_lab(image)`.
  Returns uint8 [H, W] cluster ids 0..K'-1, K' <= num_clusters, constant on each superpixel.
  """
  if not 1 <= num_clusters <= 255:
    raise ValueError(f"data.color_clusters must be in 1..255 (uint8 maps), got {num_clusters}")
  if position_weight < 0:
    raise ValueError(f"data.cluster_position_weight must be >= 0, got {position_weight}")
  h, w = superpixels.shape
  if image.shape[:2] != (h, w):
    raise ValueError(f"image {image.shape[:2]} and superpixels {(h, w)} differ in size")
  sp = superpixels.reshape(-1)
  s = int(sp.max()) + 1
  area = np.bincount(sp, minlength=s).astype(np.float64)
  if lab is None:
    lab = rgb_to_lab(image)
  elif lab.shape != (h, w, 3):
    raise ValueError(f"lab {lab.shape} is not the image's [H, W, 3] {(h, w, 3)}")
  lab = np.asarray(lab, np.float64).reshape(-1, 3)
  feats = [np.bincount(sp, lab[:, j], minlength=s) for j in range(3)]
  if position_weight > 0:
    yy, xx = np.divmod(np.arange(h * w), w)
    feats.append(position_weight / max(h - 1, 1) * np.bincount(sp, yy.astype(np.float64), s))
    feats.append(position_weight / max(w - 1, 1) * np.bincount(sp, xx.astype(np.float64), s))
  present = area > 0  # compute() ids are consecutive, but accept gaps.
  points = np.stack(feats, axis=1)[present] / area[present, None]
  table = np.zeros(s, np.uint8)
  table[present] = kmeans(points, area[present], num_clusters)
  return table[superpixels]


# ------------------------------------------------------------------------------- on disk


def default_dir(
  root: str, backend: str, n_segments: int, scale: int = 1, iterations: int = ITERATIONS
) -> str:
  """<root>/Superpixels_<backend>_<n_segments>[_s<scale>][_i<iterations>]: the suffixes only
  where the setting differs from the reference (1, 10), so older folders keep their names."""
  name = f"Superpixels_{backend}_{n_segments}"
  name += f"_s{int(scale)}" if int(scale) != 1 else ""
  name += f"_i{int(iterations)}" if int(iterations) != ITERATIONS else ""
  return str(epath.Path(root) / name)


def directory(data_cfg, root: str) -> str:
  """Where a dataset's superpixel maps live (data.superpixel_dir or the default under root)."""
  if data_cfg.superpixel_dir:
    return data_cfg.superpixel_dir
  return default_dir(
    root,
    data_cfg.superpixel_backend,
    data_cfg.n_segments,
    data_cfg.superpixel_scale,
    data_cfg.slic_iterations,
  )


def cluster_folder(num_clusters: int, position_weight: float) -> str:
  """Name of the colour-cluster folder inside a superpixel folder, e.g. clusters_k8 (colour
  only) or clusters_k8_p50 (position weight 50): the settings are in the name, so maps made
  with other settings are never mistaken for these."""
  name = f"clusters_k{int(num_clusters)}"
  return f"{name}_p{float(position_weight):g}" if position_weight else name


def cluster_directory(data_cfg, root: str) -> str:
  """Where a dataset's colour-cluster maps live: beside its superpixels (module docstring)."""
  return str(
    epath.Path(directory(data_cfg, root))
    / cluster_folder(data_cfg.color_clusters, data_cfg.cluster_position_weight)
  )


def command(data_cfg, split: str) -> str:
  """The exact CLI call that precomputes this configuration's superpixels (and colour clusters)
  for a split."""
  config = {"voc": "configs/voc.py", "coco": "configs/coco.py", "folder": "configs/folder.py"}.get(
    data_cfg.name, "configs/demo.py"
  )
  parts = [
    f"python -m ssr_jax.data.superpixels --config {config}",
    f"--config.data.root={data_cfg.root}",
    f"--split {split}",
  ]
  parts.append(f"--config.data.superpixel_backend={data_cfg.superpixel_backend}")
  parts.append(f"--config.data.n_segments={data_cfg.n_segments}")
  parts.append(f"--config.data.superpixel_scale={data_cfg.superpixel_scale}")
  parts.append(f"--config.data.slic_iterations={data_cfg.slic_iterations}")
  if data_cfg.superpixel_dir:
    parts.append(f"--config.data.superpixel_dir={data_cfg.superpixel_dir}")
  parts.append(f"--config.data.color_clusters={data_cfg.color_clusters}")
  if data_cfg.cluster_position_weight:
    parts.append(f"--config.data.cluster_position_weight={data_cfg.cluster_position_weight:g}")
  return " ".join(parts)


def check_superpixels(data_cfg, split: str, *, clusters: bool = False) -> str:
  """Raises DataError unless every image of the split has a superpixel file (and, with
  clusters=True, a colour-cluster file); returns the superpixel dir.

  The error names the missing path(s) and the exact command that creates them.
  """
  ds = registry.get_dataset(data_cfg)
  d = directory(data_cfg, ds.root)
  ids = ds.resolve(split).ids
  _require(data_cfg, d, split, ids)
  if clusters:
    _require_clusters(data_cfg, d, cluster_directory(data_cfg, ds.root), split, ids)
  return d


def split_paths(data_cfg, split: Split) -> tuple[str, ...]:
  """Each image's superpixel file, after checking they all exist (as check_superpixels)."""
  d = directory(data_cfg, split.root)
  _require(data_cfg, d, split.name, split.ids)
  return split.superpixel_paths(d)


def cluster_paths(data_cfg, split: Split) -> tuple[str, ...]:
  """Each image's colour-cluster file, after checking they all exist (as check_superpixels
  with clusters=True; a superpixel folder from before colour clusters is refused)."""
  d, cd = directory(data_cfg, split.root), cluster_directory(data_cfg, split.root)
  _require(data_cfg, d, split.name, split.ids)
  _require_clusters(data_cfg, d, cd, split.name, split.ids)
  return split.superpixel_paths(cd)


def _require(data_cfg, d: str, split: str, ids) -> None:
  fix = f"create them with:\n  {command(data_cfg, split)}"
  if not epath.Path(d).is_dir():
    raise DataError(f"superpixel folder {d} does not exist (SGC needs it); {fix}")
  missing = _missing(d, ids)
  if missing:
    raise DataError(
      f"{len(missing)} of {len(ids)} superpixel files for split {split!r} are missing, "
      f"e.g. {missing[0]}; {fix}"
    )


def _require_clusters(data_cfg, d: str, cd: str, split: str, ids) -> None:
  fix = (
    f"create them with (it keeps the valid superpixels and adds the clusters):\n  "
    f"{command(data_cfg, split)}"
  )
  if not epath.Path(cd).is_dir():
    raise DataError(
      f"superpixel folder {d} has no colour clusters {epath.Path(cd).name}/ (data."
      f"color_clusters={data_cfg.color_clusters}, data.cluster_position_weight="
      f"{data_cfg.cluster_position_weight:g}; folders made before colour clusters existed have "
      f"none) and SGC's target regions need them; {fix}"
    )
  missing = _missing(cd, ids)
  if missing:
    raise DataError(
      f"{len(missing)} of {len(ids)} colour-cluster files for split {split!r} are missing, "
      f"e.g. {missing[0]}; {fix}"
    )


def _missing(d: str, ids) -> list[str]:
  """The files <d>/<id>.png that do not exist."""
  return dataset.missing_files([str(epath.Path(d) / f"{i}.png") for i in ids])


class _Task(NamedTuple):
  """One image's precompute job (small and picklable for worker processes)."""

  image_path: str
  sp_path: str
  cluster_path: str
  backend: str
  n_segments: int
  compactness: float
  sigma: float
  scale: int
  iterations: int
  num_clusters: int
  position_weight: float
  verify: bool


def _load(path, read, hw, limit=None):
  """(map, None) if the file decodes, has size hw (and ids < limit), else (None, problem)."""
  if not epath.Path(path).is_file():
    return None, f"missing: {path}"
  try:
    m = read(path)
  except DataError as e:
    return None, str(e)
  if m.shape != hw:
    return None, f"{path} is {m.shape[0]}x{m.shape[1]} but its image is {hw[0]}x{hw[1]}"
  if limit is not None and m.size and m.max() >= limit:
    return None, f"{path} has cluster id {m.max()} >= data.color_clusters={limit}"
  return m, None


def _work(t: _Task):
  """Makes one image's missing or invalid files; returns (wrote, problems)."""
  try:
    hw = files.image_size(t.image_path)
  except DataError as e:
    if t.verify:
      return False, [str(e)]
    raise
  sp, sp_problem = _load(t.sp_path, files.read_superpixels, hw)
  cl, cl_problem = _load(t.cluster_path, files.read_clusters, hw, t.num_clusters)
  if sp_problem is None and cl_problem is None:
    table = np.zeros(int(sp.max()) + 1, np.int32)
    table[sp] = cl  # Any pixel's cluster per superpixel; all agree when made from these.
    if not np.array_equal(table[sp], cl):
      cl_problem = f"{t.cluster_path} is not constant on the superpixels of {t.sp_path} (stale)"
  if t.verify or (sp_problem is None and cl_problem is None):
    return False, [p for p in (sp_problem, cl_problem) if p]
  image = files.read_image(t.image_path)
  # One Lab conversion for SLIC and the clusters where the settings share it.
  lab = opencv_lab(image) if shares_lab(t.backend, t.scale) else None
  if sp_problem is not None:  # New superpixels always get new clusters (derived from them).
    sp = compute(
      image,
      backend=t.backend,
      n_segments=t.n_segments,
      compactness=t.compactness,
      sigma=t.sigma,
      scale=t.scale,
      iterations=t.iterations,
      lab=lab,
    )
    if sp.max() > np.iinfo(np.uint16).max:
      return False, [f"{t.image_path}: {sp.max() + 1} superpixels do not fit uint16"]
    files.write_png(t.sp_path, sp.astype(np.uint16))
  clusters = color_clusters(
    image, sp, num_clusters=t.num_clusters, position_weight=t.position_weight, lab=lab
  )
  files.write_png(t.cluster_path, clusters)
  return True, []


def _init_worker():
  """Worker processes: OpenCV single-threaded, the process pool already fills the cores."""
  try:
    import cv2

    cv2.setNumThreads(1)
  except ImportError:
    pass


def precompute(
  data_cfg, split: str, *, workers: int = 0, verify: bool = False, progress: bool = True
) -> dict:
  """Computes (or with verify=True only checks) the superpixel and colour-cluster files of a
  split; workers 0 = one process per usable core.

  Returns {"dir", "cluster_dir", "total", "written", "problems": [...]}.
  """
  ds = registry.get_dataset(data_cfg)
  sf = ds.resolve(split)
  # Every missing image in one error before any work (not the first one a worker meets).
  missing = dataset.missing_files(sf.images)
  if missing:
    where = dataset.where(split, sf.list_file)
    raise DataError(dataset.missing_summary(missing, sf.images, where, ds.manual))
  d, cd = directory(data_cfg, ds.root), cluster_directory(data_cfg, ds.root)
  k, pw = int(data_cfg.color_clusters), float(data_cfg.cluster_position_weight)
  if not 1 <= k <= 255 or pw < 0:
    raise DataError(
      f"data.color_clusters={k} must be in 1..255 and data.cluster_position_weight={pw:g} >= 0"
    )
  if int(data_cfg.superpixel_scale) < 1 or int(data_cfg.slic_iterations) < 1:
    raise DataError(
      f"data.superpixel_scale={data_cfg.superpixel_scale} and data.slic_iterations="
      f"{data_cfg.slic_iterations} must be integers >= 1"
    )
  tasks = [
    _Task(
      image_path=img,
      sp_path=str(epath.Path(d) / f"{i}.png"),
      cluster_path=str(epath.Path(cd) / f"{i}.png"),
      backend=data_cfg.superpixel_backend,
      n_segments=data_cfg.n_segments,
      compactness=data_cfg.compactness,
      sigma=data_cfg.sigma,
      scale=int(data_cfg.superpixel_scale),
      iterations=int(data_cfg.slic_iterations),
      num_clusters=k,
      position_weight=pw,
      verify=verify,
    )
    for i, img in zip(sf.ids, sf.images)
  ]
  written, problems = 0, []
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=f"superpixels {split}", unit="img", file=sys.stderr)
  workers = workers or parallel.usable_cpus()
  # Chunks of up to 16 images, but at least ~4 per worker so short runs keep every core busy.
  chunk = max(1, min(16, len(tasks) // (4 * workers)))
  jobs = parallel.imap(_work, tasks, workers=workers, chunksize=chunk, initializer=_init_worker)
  for wrote, probs in jobs:
    written += wrote
    problems.extend(probs)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  return {
    "dir": d,
    "cluster_dir": cd,
    "total": len(tasks),
    "written": written,
    "problems": problems,
  }


def main(argv):
  from absl import flags

  del argv
  cfg = flags.FLAGS.config
  split = flags.FLAGS.split or cfg.data.train_split
  try:
    out = precompute(cfg.data, split, workers=flags.FLAGS.workers, verify=flags.FLAGS.verify)
  except DataError as e:
    raise SystemExit(f"error: {e}") from None
  for p in out["problems"][:50]:
    print(p, file=sys.stderr)
  print(
    f"{out['dir']} (colour clusters in {epath.Path(out['cluster_dir']).name}/): "
    f"{out['total']} images, {out['written']} written, {len(out['problems'])} problem(s)"
  )
  if out["problems"]:
    raise SystemExit(1)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
  flags.DEFINE_string("split", "", "Split to process (default: data.train_split).")
  flags.DEFINE_bool("verify", False, "Only check the existing files; list every problem.")
  flags.DEFINE_integer("workers", 0, "Processes (0 = one per usable core).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
