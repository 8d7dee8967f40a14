"""Procedural segmentation dataset for tests and the demo: no download, deterministic, any size.

Six object classes with distinct shape, colour and texture (boat, horse, rider, car, bird,
flower) on five textured backgrounds (water, grass, sky, sand, road), exact masks, image-level
labels and a caption per image ("a photo of a horse and a rider on grass.") for contrastive
pretraining of a tiny CLIP. It reproduces the two failure modes SSR targets (§0):
- co-occurring, touching classes: a rider only ever appears sitting on a horse (its torso
  overlaps the horse's back), and 75% of horses carry one, so CAMs for either class tend to
  spread onto the partner (non-target foreground over-activation; what CMPA addresses);
- class-correlated backgrounds: boats are on water 90% of the time and water almost never
  appears without a boat; cars are on roads and birds in the sky 80% of the time, so CAMs
  spread onto the correlated background (background over-activation; what SGC addresses).
These rates are the dials of `World` (config `data.synthetic.*`); its defaults are the rates
above and reproduce the data written before the dials existed bit for bit.
Objects cover roughly 8-25% of the image each (1-3 object groups per image), and are drawn
without anti-aliasing so the mask is exact. Image i of stream k is a pure function of
(seed, k, i): any subset can be regenerated.

On disk (`write_dataset`; `open_dataset` reads it with the same interface as voc.py, and
`read_split` loads a split into memory, e.g. for CLIP pretraining):
  root/spec.json                      names, palette, size, seed, counts (written last)
  root/JPEGImages/<id>.png            lossless RGB images (<id> = train_00000, val_00000, ...)
  root/SegmentationClass/<id>.png     uint8 masks (0 background, 1..6)
  root/ImageSets/{train,val}.txt      split lists
  root/ImageLabels/{train,val}.txt    "id v1 v2 ..." image-level labels (mask values)
  root/Captions/{train,val}.txt       "id<TAB>caption"
CLI: `python -m ssr_jax.data.synthetic --out ROOT [--num-train 512 --num-val 128 --size 128]
[--rider-on-horse 0.75 ...]` (one flag per `World` dial).
"""

import argparse
import dataclasses
import io
import json

import numpy as np
from etils import epath
from PIL import Image
from skimage import draw

from ssr_jax.data import dataset, files
from ssr_jax.data.files import DataError

FORMAT_VERSION = 1
STREAMS = {"train": 0, "val": 1}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Names for prompts ("a photo of a {}."), background names (§1.2) and the mask palette."""

  class_names: tuple[str, ...] = ("boat", "horse", "rider", "car", "bird", "flower")
  bg_names: tuple[str, ...] = ("water", "grass", "sky", "sand", "road")
  palette: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (128, 0, 0),
    (0, 128, 0),
    (128, 128, 0),
    (0, 0, 128),
    (128, 0, 128),
    (0, 128, 128),
  )

  @property
  def num_classes(self) -> int:
    return len(self.class_names) + 1


SPEC = SyntheticSpec()


@dataclasses.dataclass(frozen=True)
class World:
  """The rates of the two failure modes (probabilities in [0, 1]; defaults: the original world).

  rider_on_horse: P(a horse carries a rider) (co-occurrence of touching classes, §2);
  rider_alone: P(a horse group is a rider standing alone instead), which breaks "rider implies
    horse" (0: a rider is always on a horse);
  boat_on_water, car_on_road, bird_in_sky: P(the scene's background is the class's own, given
    the group that sets the scene), the rest shared as in SCENE_BG (background correlation, §3);
  water_without_boat: P(a scene set by another class is on water), which breaks "water implies
    boat" (0: water only ever carries boats and birds).
  Draws for rider_alone and water_without_boat happen only when they are > 0, so every default
  image is unchanged.
  """

  rider_on_horse: float = 0.75
  rider_alone: float = 0.0
  boat_on_water: float = 0.9
  car_on_road: float = 0.8
  bird_in_sky: float = 0.8
  water_without_boat: float = 0.0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"data.synthetic.{f.name}={v}: a probability, use a value in [0, 1]")

  def changed(self) -> dict:
    """{field: value} of the dials that differ from the defaults."""
    default = World()
    return {k: v for k, v in dataclasses.asdict(self).items() if getattr(default, k) != v}


def world_from_config(synthetic_cfg) -> World:
  """The World of config.data.synthetic; DataError naming the field if a rate is out of range."""
  try:
    return World(**{f.name: float(synthetic_cfg[f.name]) for f in dataclasses.fields(World)})
  except ValueError as e:
    raise DataError(str(e)) from None


BOAT, HORSE, RIDER, CAR, BIRD, FLOWER = range(1, 7)  # Mask values.
WATER, GRASS, SKY, SAND, ROAD = range(5)  # Background indices into SPEC.bg_names.
WHERE = {
  WATER: "on water",
  GRASS: "on grass",
  SKY: "in the sky",
  SAND: "on sand",
  ROAD: "on a road",
}
# Background choice given the group that sets the scene (the correlations described above).
SCENE_BG = {
  BOAT: ((WATER, 0.9), (SAND, 0.1)),
  HORSE: ((GRASS, 0.6), (SAND, 0.3), (ROAD, 0.1)),
  CAR: ((ROAD, 0.8), (SAND, 0.1), (GRASS, 0.1)),
  BIRD: ((SKY, 0.8), (GRASS, 0.1), (SAND, 0.1)),
  FLOWER: ((GRASS, 0.6), (SAND, 0.3), (ROAD, 0.1)),
}
# Each scene class's own background, and the World dial that sets its rate.
HOME_BG = {BOAT: (WATER, "boat_on_water"), CAR: (ROAD, "car_on_road"), BIRD: (SKY, "bird_in_sky")}
GROUPS = (BOAT, HORSE, CAR, BIRD, FLOWER)  # A horse group may carry a rider.
TEMPLATES = ("a photo of {objs} {where}.", "{objs} {where}.", "a picture of {objs} {where}.")


# ------------------------------------------------------------------------------- rendering


class _Canvas:
  """Image + mask being painted; later paints cover earlier ones (painter's order)."""

  def __init__(self, size, rng):
    self.size = size
    self.rng = rng
    self.image = np.zeros((size, size, 3), np.float32)
    self.mask = np.zeros((size, size), np.uint8)
    self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)

  def region(self, kind, *args):
    m = np.zeros((self.size, self.size), bool)
    shape = (self.size, self.size)
    if kind == "poly":
      ys, xs = args
      rr, cc = draw.polygon(np.asarray(ys), np.asarray(xs), shape=shape)
    elif kind == "ellipse":
      cy, cx, ry, rx = args
      rr, cc = draw.ellipse(cy, cx, max(ry, 1), max(rx, 1), shape=shape)
    elif kind == "rect":
      y0, x0, y1, x1 = args
      rr, cc = draw.rectangle((y0, x0), end=(y1, x1), shape=shape)
      rr, cc = rr.ravel(), cc.ravel()
    else:  # disk
      cy, cx, r = args
      rr, cc = draw.disk((cy, cx), max(r, 1), shape=shape)
    m[rr, cc] = True
    return m

  def paint(self, region, colour, value, texture=None):
    col = np.asarray(colour, np.float32)
    pix = np.broadcast_to(col, self.image.shape)
    if texture is not None:
      pix = pix * texture[..., None]
    self.image[region] = pix[region]
    self.mask[region] = value


def _jitter(rng, colour, amount=0.12):
  """An instance colour: the class colour scaled by ~+-12% (keeps the hue recognisable)."""
  return np.clip(np.asarray(colour, np.float32) * rng.uniform(1 - amount, 1 + amount), 0, 255)


def _background(cv: _Canvas, kind: int):
  rng, yy, xx, s = cv.rng, cv.yy, cv.xx, cv.size
  noise = rng.normal(0.0, 1.0, (s, s)).astype(np.float32)
  if kind == WATER:
    base = _jitter(rng, (25, 75, 165))
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.45)
    waves = 0.5 + 0.5 * np.sin(yy * freq + 0.6 * np.sin(xx * 0.15 + phase))
    tex = 0.8 + 0.35 * waves**6 + 0.04 * noise
  elif kind == GRASS:
    base = _jitter(rng, (55, 140, 45))
    blades = rng.normal(0.0, 1.0, (s // 3 + 1, s)).astype(np.float32).repeat(3, 0)[:s]
    tex = 0.9 + 0.12 * blades + 0.05 * noise
  elif kind == SKY:
    base = _jitter(rng, (130, 185, 235))
    tex = 0.85 + 0.2 * (yy / s) + 0.015 * noise
  elif kind == SAND:
    base = _jitter(rng, (215, 190, 135))
    tex = 0.93 + 0.07 * noise
  else:  # ROAD
    base = _jitter(rng, (95, 95, 100))
    tex = 0.95 + 0.06 * noise
  cv.image[:] = base * tex[..., None]
  if kind == SKY:  # A few clouds.
    for _ in range(rng.integers(1, 4)):
      cl = cv.region("ellipse", rng.uniform(0, s), rng.uniform(0, s), s * 0.06, s * 0.16)
      cv.image[cl] = 245.0
  if kind == ROAD:  # Dashed lane line.
    y = rng.uniform(0.3, 0.7) * s
    dash = ((xx + rng.uniform(0, 20)) % (s / 4)) < s / 8
    line = (np.abs(yy - y) < max(1.0, s / 80)) & dash
    cv.image[line] = (235.0, 220.0, 120.0)


def _boat(cv, cx, cy, s, d):
  rng = cv.rng
  top, depth = cy + 0.1 * s, 0.24 * s
  hull = cv.region(
    "poly",
    [top, top, top + depth, top + depth],
    [cx - 0.5 * s, cx + 0.5 * s, cx + 0.33 * s, cx - 0.33 * s],
  )
  stripes = 0.75 + 0.5 * (((cv.yy - top) // max(1.0, s / 14)) % 2)
  cv.paint(hull, _jitter(rng, (150, 40, 30)), BOAT, stripes)
  mx = cx - d * 0.05 * s
  mast = cv.region("rect", cy - 0.6 * s, mx - 0.02 * s, top, mx + 0.02 * s)
  cv.paint(mast, (70, 45, 25), BOAT)
  sail = cv.region(
    "poly", [cy - 0.58 * s, top - 0.06 * s, top - 0.06 * s], [mx, mx, mx + d * 0.42 * s]
  )
  cv.paint(sail, _jitter(rng, (240, 235, 215), 0.04), BOAT)


def _horse(cv, cx, cy, s, d):
  rng = cv.rng
  col = _jitter(rng, (140, 80, 40))
  spots = 0.9 + 0.1 * np.sin(cv.xx * 0.9) * np.sin(cv.yy * 0.9)
  for off in (-0.3, -0.17, 0.17, 0.3):  # Legs.
    x = cx + d * off * s
    cv.paint(cv.region("rect", cy, x - 0.035 * s, cy + 0.48 * s, x + 0.035 * s), col * 0.8, HORSE)
  cv.paint(cv.region("ellipse", cy, cx, 0.2 * s, 0.42 * s), col, HORSE, spots)
  neck = cv.region(
    "poly",
    [cy - 0.02 * s, cy - 0.14 * s, cy - 0.42 * s, cy - 0.36 * s],
    [cx + d * 0.22 * s, cx + d * 0.36 * s, cx + d * 0.52 * s, cx + d * 0.38 * s],
  )
  cv.paint(neck, col, HORSE, spots)
  cv.paint(cv.region("ellipse", cy - 0.4 * s, cx + d * 0.55 * s, 0.08 * s, 0.15 * s), col, HORSE)
  mane = cv.region(
    "poly",
    [cy - 0.12 * s, cy - 0.44 * s, cy - 0.4 * s],
    [cx + d * 0.24 * s, cx + d * 0.44 * s, cx + d * 0.36 * s],
  )
  cv.paint(mane, (50, 30, 20), HORSE)
  tail = cv.region(
    "poly",
    [cy - 0.08 * s, cy + 0.3 * s, cy + 0.3 * s],
    [cx - d * 0.4 * s, cx - d * 0.5 * s, cx - d * 0.42 * s],
  )
  cv.paint(tail, (50, 30, 20), HORSE)


def _rider(cv, cx, cy, s, d):
  """A rider sitting on the horse drawn at (cx, cy, s): torso overlaps the horse's back."""
  rng = cv.rng
  shirt = _jitter(rng, (200, 30, 120))
  stripes = 0.8 + 0.35 * ((cv.yy // max(1.0, s / 16)) % 2)
  tx = cx - d * 0.05 * s
  torso_top, torso_bot = cy - 0.62 * s, cy - 0.12 * s
  cv.paint(
    cv.region("rect", torso_top, tx - 0.14 * s, torso_bot, tx + 0.14 * s), shirt, RIDER, stripes
  )
  arm = cv.region(
    "poly",
    [torso_top + 0.08 * s, torso_top + 0.16 * s, cy - 0.22 * s, cy - 0.3 * s],
    [tx, tx, tx + d * 0.36 * s, tx + d * 0.36 * s],
  )
  cv.paint(arm, shirt, RIDER, stripes)
  leg = cv.region("rect", cy - 0.15 * s, tx - 0.06 * s, cy + 0.22 * s, tx + 0.06 * s)
  cv.paint(leg, _jitter(rng, (40, 50, 110)), RIDER)
  cv.paint(
    cv.region("disk", torso_top - 0.1 * s, tx, 0.12 * s), _jitter(rng, (240, 200, 160)), RIDER
  )
  helmet = cv.region("ellipse", torso_top - 0.17 * s, tx, 0.07 * s, 0.13 * s)
  cv.paint(helmet, (25, 25, 25), RIDER)


def _car(cv, cx, cy, s, d):
  rng = cv.rng
  col = _jitter(rng, (235, 200, 30))
  body = cv.region("rect", cy - 0.05 * s, cx - 0.5 * s, cy + 0.24 * s, cx + 0.5 * s)
  cv.paint(body, col, CAR)
  cabin = cv.region(
    "poly",
    [cy - 0.05 * s, cy - 0.05 * s, cy - 0.3 * s, cy - 0.3 * s],
    [cx - 0.32 * s, cx + 0.32 * s, cx + 0.2 * s, cx - 0.22 * s],
  )
  cv.paint(cabin, col, CAR)
  for x0, x1 in ((-0.24, -0.04), (0.02, 0.2)):  # Windows (part of the car).
    w = cv.region("rect", cy - 0.25 * s, cx + x0 * s, cy - 0.08 * s, cx + x1 * s)
    cv.paint(w, (60, 80, 100), CAR)
  for off in (-0.3, 0.3):
    cv.paint(cv.region("disk", cy + 0.24 * s, cx + off * s, 0.12 * s), (20, 20, 20), CAR)
    cv.paint(cv.region("disk", cy + 0.24 * s, cx + off * s, 0.05 * s), (170, 170, 170), CAR)
  del d


def _bird(cv, cx, cy, s, d):
  rng = cv.rng
  col = _jitter(rng, (35, 35, 45))
  feathers = 0.8 + 0.4 * (((cv.xx + cv.yy) // max(1.0, s / 12)) % 2)
  wing_up = rng.uniform() < 0.5
  tip = cy - 0.48 * s if wing_up else cy + 0.42 * s
  for off in (-0.12, 0.1):
    wing = cv.region("poly", [cy, cy, tip], [cx - 0.12 * s, cx + 0.14 * s, cx + d * off * s])
    cv.paint(wing, col * 1.3, BIRD, feathers)
  cv.paint(cv.region("ellipse", cy, cx, 0.13 * s, 0.32 * s), col, BIRD)
  hx = cx + d * 0.3 * s
  cv.paint(cv.region("disk", cy - 0.08 * s, hx, 0.11 * s), col, BIRD)
  beak = cv.region(
    "poly", [cy - 0.12 * s, cy - 0.04 * s, cy - 0.08 * s], [hx, hx, hx + d * 0.22 * s]
  )
  cv.paint(beak, (240, 140, 20), BIRD)


def _flower(cv, cx, cy, s, d):
  rng = cv.rng
  stem = cv.region("rect", cy, cx - 0.03 * s, cy + 0.55 * s, cx + 0.03 * s)
  cv.paint(stem, (30, 90, 30), FLOWER)
  leaf = cv.region("ellipse", cy + 0.35 * s, cx + d * 0.12 * s, 0.05 * s, 0.12 * s)
  cv.paint(leaf, (30, 100, 30), FLOWER)
  petal = _jitter(rng, (240, 110, 185))
  n = int(rng.integers(5, 8))
  a0 = rng.uniform(0, 2 * np.pi)
  for k in range(n):
    a = a0 + 2 * np.pi * k / n
    cv.paint(
      cv.region("disk", cy + 0.22 * s * np.sin(a), cx + 0.22 * s * np.cos(a), 0.15 * s),
      petal * (0.9 + 0.1 * (k % 2)),
      FLOWER,
    )
  cv.paint(cv.region("disk", cy, cx, 0.12 * s), (250, 210, 40), FLOWER)


# Per group: draw functions, size range (fraction of the image side), bbox in units of s
# relative to the anchor (left, top, right, bottom).
_GROUP = {
  BOAT: ((0.55, 0.8), (-0.5, -0.62, 0.5, 0.34)),
  HORSE: ((0.5, 0.68), (-0.52, -0.5, 0.7, 0.48)),
  CAR: ((0.5, 0.75), (-0.5, -0.3, 0.5, 0.36)),
  BIRD: ((0.6, 0.85), (-0.36, -0.48, 0.52, 0.42)),
  FLOWER: ((0.5, 0.7), (-0.37, -0.37, 0.37, 0.55)),
}
_RIDER_BOX = (-0.25, -0.9, 0.4, 0.48)  # Horse box grown by a rider on top.
_LONE_RIDER_BOX = (-0.25, -0.9, 0.4, 0.22)  # A rider standing alone (no horse below).
_DRAW = {BOAT: _boat, HORSE: _horse, CAR: _car, BIRD: _bird, FLOWER: _flower}


def _choose(rng, table):
  vals, probs = zip(*table)
  return vals[int(rng.choice(len(vals), p=np.asarray(probs) / sum(probs)))]


def scene_backgrounds(world: World) -> dict:
  """SCENE_BG with each HOME_BG class's own background at the world's rate; the other
  backgrounds keep their relative shares."""
  table = dict(SCENE_BG)
  for g, (home, dial) in HOME_BG.items():
    rate = getattr(world, dial)
    rest = [(b, p) for b, p in SCENE_BG[g] if b != home]
    total = sum(p for _, p in rest)
    table[g] = ((home, rate), *((b, p * (1.0 - rate) / total) for b, p in rest))
  return table


def _place(rng, size, box, placed):
  """Anchor (cx, cy) keeping the box inside the image, avoiding earlier boxes if possible."""
  l, t, r, b = box
  best, best_overlap = None, np.inf
  for _ in range(30):
    cx = rng.uniform(-l, size - r) if size - r > -l else size / 2
    cy = rng.uniform(-t, size - b) if size - b > -t else size / 2
    cand = (cx + l, cy + t, cx + r, cy + b)
    overlap = sum(_inter(cand, p) for p in placed) / max((r - l) * (b - t), 1e-6)
    if overlap < best_overlap:
      best, best_overlap = (cx, cy, cand), overlap
    if overlap < 0.1:
      break
  return best


def _inter(a, b):
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  return max(w, 0.0) * max(h, 0.0)


def render(rng: np.random.Generator, size: int, *, decorrelated: bool = False, world=World()):
  """One example: (image uint8 [S, S, 3], mask uint8 [S, S], caption str); see `render_scene`."""
  return render_scene(rng, size, decorrelated=decorrelated, world=world)[:3]


def render_scene(
  rng: np.random.Generator, size: int, *, decorrelated: bool = False, world: World = World()
):
  """One example: (image uint8 [S, S, 3], mask uint8 [S, S], caption str, scene dict).

  scene: {"background": name, "groups": [name of each object group in painting order:
  "horse+rider", "rider" (standing alone), "boat", ...]}, what the dials act on.
  decorrelated: backgrounds and groups drawn independently and uniformly (riders still only
  ride horses, at world's rates). The demo pretrains its tiny CLIP on such a stream, standing in
  for the broad, varied image-text data real CLIP sees, while the WSSS splits keep the
  correlations.
  """
  n_groups = int(rng.choice(3, p=(0.55, 0.35, 0.1))) + 1
  groups = [int(rng.choice(GROUPS))]
  if decorrelated:
    bg = int(rng.integers(len(SPEC.bg_names)))
    others = GROUPS
  else:
    bg = _choose(rng, scene_backgrounds(world)[groups[0]])  # The first group sets the scene.
    w = world.water_without_boat
    if groups[0] != BOAT and w > 0 and rng.uniform() < w:
      bg = WATER
    # Boats only ever float: on water a boat's scene holds boats or birds, any other scene and
    # every other background never a boat, so a boat (nearly always) implies water and water
    # (unless water_without_boat) a boat.
    boat_scene = bg == WATER and groups[0] == BOAT
    others = (BOAT, BIRD) if boat_scene else tuple(g for g in GROUPS if g != BOAT)
  for _ in range(n_groups - 1):
    groups.append(int(rng.choice(others)))
  cv = _Canvas(size, rng)
  _background(cv, bg)
  placed, names = [], []
  for g in groups:
    (lo, hi), box = _GROUP[g]
    s = rng.uniform(lo, hi) * size / (1.0 + 0.15 * (len(groups) - 1))
    # Drawn only when the dial is on, so that default worlds consume the same random numbers.
    alone = g == HORSE and world.rider_alone > 0 and rng.uniform() < world.rider_alone
    rider = g == HORSE and not alone and rng.uniform() < world.rider_on_horse
    if rider:
      box = tuple(
        min(a, c) if i < 2 else max(a, c) for i, (a, c) in enumerate(zip(box, _RIDER_BOX))
      )
    elif alone:
      box = _LONE_RIDER_BOX
    d = 1.0 if rng.uniform() < 0.5 else -1.0
    px = tuple(v * s for v in (box if d > 0 else (-box[2], box[1], -box[0], box[3])))
    cx, cy, bbox = _place(rng, size, px, placed)
    placed.append(bbox)
    if not alone:
      _DRAW[g](cv, cx, cy, s, d)
    if rider or alone:
      _rider(cv, cx, cy, s, d)
    name = "rider" if alone else SPEC.class_names[g - 1] + ("+rider" if rider else "")
    names.append(name)
  image = np.clip(np.rint(cv.image), 0, 255).astype(np.uint8)
  present = [v for v in range(1, SPEC.num_classes) if (cv.mask == v).any()]
  labels = [SPEC.class_names[v - 1] for v in present]
  objs = [f"a {n}" for n in labels]
  if len(objs) > 1:
    objs = ", ".join(objs[:-1]) + " and " + objs[-1]
  else:
    objs = objs[0] if objs else "nothing"
  caption = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(objs=objs, where=WHERE[bg])
  scene = dict(background=SPEC.bg_names[bg], groups=names)
  return image, cv.mask, caption, scene


def generate(
  num: int,
  *,
  size: int,
  seed: int,
  stream: int = 0,
  start: int = 0,
  decorrelated: bool = False,
  world: World = World(),
) -> dict:
  """Examples start..start+num-1 of a stream, each a pure function of (seed, stream, index, world).

  decorrelated: see `render_scene` (the demo's CLIP-pretraining stream).

  Returns image uint8 [N, S, S, 3], mask uint8 [N, S, S], labels float32 [N, 6] (multi-hot of
  the classes present in the mask), caption list[str], id list[str] ("train_00012" for stream 0,
  "val_..." for 1), background list[str] and groups list[list[str]] (`render_scene`'s scene).
  """
  images, masks, captions, scenes = [], [], [], []
  for i in range(start, start + num):
    rng = np.random.default_rng([int(seed), int(stream), i])
    img, m, cap, scene = render_scene(rng, size, decorrelated=decorrelated, world=world)
    images.append(img)
    masks.append(m)
    captions.append(cap)
    scenes.append(scene)
  c = SPEC.num_classes
  mask = np.stack(masks) if masks else np.zeros((0, size, size), np.uint8)
  name = {v: k for k, v in STREAMS.items()}.get(stream, f"s{stream}")
  return {
    "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
    "mask": mask,
    "labels": np.stack([dataset.mask_labels(m, c) for m in mask]).reshape(-1, c - 1),
    "caption": captions,
    "id": [f"{name}_{i:05d}" for i in range(start, start + num)],
    "background": [sc["background"] for sc in scenes],
    "groups": [sc["groups"] for sc in scenes],
  }


# ------------------------------------------------------------------------------- on disk


def _spec_dict(num_train, num_val, size, seed, world):
  # The dials are recorded only when they differ from the defaults: folders written before they
  # existed still match the default world.
  dials = {"world": world.changed()} if world.changed() else {}
  return {
    "version": FORMAT_VERSION,
    "class_names": list(SPEC.class_names),
    "bg_names": list(SPEC.bg_names),
    "palette": [list(c) for c in SPEC.palette],
    "num_train": int(num_train),
    "num_val": int(num_val),
    "size": int(size),
    "seed": int(seed),
    **dials,
  }


def _write(root: str, *, num_train: int, num_val: int, size: int, seed: int, world) -> None:
  """Generates the train and val splits under root (layout in the module docstring)."""
  root = epath.Path(root)  # Local or gs://.
  for split, num in (("train", num_train), ("val", num_val)):
    data = generate(num, size=size, seed=seed, stream=STREAMS[split], world=world)
    ids = data["id"]
    for i, img, m in zip(ids, data["image"], data["mask"]):
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format="PNG")
      files.write_bytes(root / "JPEGImages" / f"{i}.png", buf.getvalue())
      files.write_png(root / "SegmentationClass" / f"{i}.png", m)
    files.write_bytes(root / "ImageSets" / f"{split}.txt", "".join(f"{i}\n" for i in ids).encode())
    dataset.write_labels_file(str(root / "ImageLabels" / f"{split}.txt"), ids, data["labels"])
    captions = "".join(f"{i}\t{c}\n" for i, c in zip(ids, data["caption"]))
    files.write_bytes(root / "Captions" / f"{split}.txt", captions.encode())
  spec = json.dumps(_spec_dict(num_train, num_val, size, seed, world), indent=1)
  files.write_bytes(root / "spec.json", spec.encode())  # Last: marks the folder complete.


def write_dataset(
  root: str, *, num_train: int, num_val: int, size: int, seed: int, world: World = World()
) -> bool:
  """Writes the dataset under root unless root already holds exactly this one (same spec.json).

  Returns True if it wrote. spec.json is written last, so an interrupted write is redone.
  Files derived from an earlier dataset in root (superpixels) are not removed: give each world
  its own root (the demo does).
  """
  path = epath.Path(root) / "spec.json"
  if path.is_file():
    if json.loads(path.read_text()) == _spec_dict(num_train, num_val, size, seed, world):
      return False
    path.unlink()
  _write(root, num_train=num_train, num_val=num_val, size=size, seed=seed, world=world)
  return True


def read_split(root: str, split: str) -> dict:
  """A written split in memory, as `generate` returns it (image, mask, labels, caption, id)."""
  ds = open_dataset(root)
  sf = ds.resolve(split)
  captions = read_captions(root, split)
  return {
    "image": np.stack([files.read_image(p) for p in sf.images]),
    "mask": np.stack([files.read_mask(p, ds.num_classes) for p in sf.masks]),
    "labels": dataset.read_labels_file(sf.labels_file, sf.ids, ds.num_classes),
    "caption": [captions[i] for i in sf.ids],
    "id": list(sf.ids),
  }


def read_captions(root: str, split: str) -> dict[str, str]:
  """id -> caption of a written split."""
  text = (epath.Path(root) / "Captions" / f"{split}.txt").read_text()
  return dict(line.split("\t", 1) for line in text.splitlines() if line.strip())


MANUAL = """\
The synthetic dataset is generated, not downloaded: python -m ssr_jax.data.synthetic --out ROOT
(or let the demo do it); data.root must be that folder (it holds spec.json, JPEGImages/,
SegmentationClass/, ImageSets/{train,val}.txt, ImageLabels/, Captions/)."""


def open_dataset(root: str, *, labels_file: str = "") -> dataset.Dataset:
  """The synthetic dataset written under root."""
  path = epath.Path(root) / "spec.json" if root else None
  if path is None or not path.is_file():
    raise DataError(f"no synthetic dataset at {root or 'data.root (empty)'}.\n{MANUAL}")
  spec = json.loads(path.read_text())
  top = epath.Path(root)

  def resolve(split):
    if split not in STREAMS:
      raise DataError(f"synthetic splits are {sorted(STREAMS)}, not {split!r}")
    lst = str(top / "ImageSets" / f"{split}.txt")
    ids = dataset.read_list(lst)
    images = [str(top / "JPEGImages" / f"{i}.png") for i in ids]
    masks = [str(top / "SegmentationClass" / f"{i}.png") for i in ids]
    labels = labels_file or str(top / "ImageLabels" / f"{split}.txt")
    return dataset.SplitFiles(ids, images, masks, lst, labels)

  return dataset.Dataset(
    name="synthetic",
    root=root,
    num_classes=len(spec["class_names"]) + 1,
    class_names=tuple(spec["class_names"]),
    bg_names=tuple(spec["bg_names"]),
    manual=MANUAL,
    resolve=resolve,
  )


def main(argv=None):
  p = argparse.ArgumentParser(description="Write the synthetic segmentation dataset.")
  p.add_argument("--out", required=True)
  p.add_argument("--num-train", type=int, default=512)
  p.add_argument("--num-val", type=int, default=128)
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  for f in dataclasses.fields(World):  # The dials, e.g. --rider-on-horse 0.5.
    p.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default)
  a = p.parse_args(argv)
  try:
    world = World(**{f.name: getattr(a, f.name) for f in dataclasses.fields(World)})
  except ValueError as e:
    p.error(str(e).replace("data.synthetic.", "--").replace("_", "-"))
  wrote = write_dataset(
    a.out, num_train=a.num_train, num_val=a.num_val, size=a.size, seed=a.seed, world=world
  )
  print(f"{'wrote' if wrote else 'up to date:'} {a.out}")


if __name__ == "__main__":
  main()
