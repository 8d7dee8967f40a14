"""Datasets (VOC-aug, COCO-2014, synthetic), superpixels and the tf.data / numpy input pipelines.

Entry points: `sources.get_dataset`, `pipeline.make_train_iterator`,
`pipeline.make_eval_dataset`, `superpixels.check_superpixels`; CLIs `python -m
ssr_jax.data.{coco,superpixels,check,synthetic}`. The training example contract both input
executors share (batch layout, order, augmentation) is examples.py.
"""
