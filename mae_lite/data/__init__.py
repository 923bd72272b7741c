"""Datasets (read from standard layouts, never downloaded) and transforms."""
from .datasets import build_dataset
from .demo import DemoPhotos
from .transforms import pretrain_transform

__all__ = ["DemoPhotos", "build_dataset", "pretrain_transform"]
