"""Datasets (read from standard layouts, never downloaded) and transforms."""
from .datasets import build_dataset
from .demo import DemoPhotos
from .shard_writer import write_shards
from .shards import ShardDataset
from .transforms import pretrain_transform

__all__ = ["DemoPhotos", "ShardDataset", "build_dataset", "pretrain_transform", "write_shards"]
