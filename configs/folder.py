"""Your own tagged images (data.name = "folder"; layout in ssr_jax/data/folder.py and the README's
"Your own data"): the paper's VOC recipe (base.py) on the folder at --config.data.root.

The class count, the prompts (classes.txt), the background prompts (background.txt or the
general default) and model.max_classes (the most classes any image carries) come from the
folder at start-up (sources.configure): the fields left empty / 0 here. Splits: labels.csv's
split column, or a seeded hold-out of data.folder.val_fraction as "val".

`configs/folder.py:tiny` is the demo's recipe instead (configs/demo.py: 96 px crops, the tiny CLIP
and DINO shipped with the package), for the synthetic set converted to a folder
(`python -m ssr_jax.data.make_folder`): minutes on a laptop CPU.
"""

import importlib.util
import os

from configs import base, demo

# The tiny CLIP and DINO shipped inside the package, wherever it is installed.
ASSETS = os.path.join(importlib.util.find_spec("ssr_jax").submodule_search_locations[0], "assets")


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(
      f"configs/folder.py:{variant}: use configs/folder.py or configs/folder.py:tiny"
    )
  c = demo.get_config() if variant == "tiny" else base.get_config()
  c.data.name = "folder"
  c.data.source = "files"
  c.data.train_split = "train"
  c.data.val_split = "val"
  c.data.num_classes = 0
  c.model.class_names = ()
  c.model.bg_names = ()
  c.model.max_classes = 0
  if variant == "tiny":
    c.clip.weights = os.path.join(ASSETS, "tiny_clip.npz")
    c.dino.weights = os.path.join(ASSETS, "tiny_dino.npz")
  c.eval.splits = ("val",)  # The held-out images (the demo also scores its train split).
  return c
