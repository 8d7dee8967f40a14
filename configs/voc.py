"""PASCAL VOC 2012 + SBD (train_aug 10,582 images; 21 classes): base.py is the VOC recipe."""

from configs import base


def get_config():
  return base.get_config()
