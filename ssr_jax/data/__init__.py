"""Datasets (VOC-aug, COCO-2014, synthetic, your own tagged folder), superpixels and the tf.data /
numpy input pipelines.

Entry points: `registry.get_dataset`, `sources.configure` (a folder dataset's classes, prompts
and max_classes into the config), `pipeline.make_train_iterator`, `pipeline.make_eval_dataset`,
`superpixels.check_superpixels`; CLIs `python -m
ssr_jax.data.{coco,superpixels,check,synthetic,make_folder,tfds_build}`. The training example
contract both input executors share (batch layout, order, augmentation) is examples.py.
"""
