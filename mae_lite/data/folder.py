"""ImageFolder scanned once per run (rank 0 lists the tree and broadcasts it: no 1.28M-file walk on every rank),
with undecodable files returned as BadImage (bad_images.py) and JPEGs left undecoded for the fast transforms."""
from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .bad_images import load


def scan(root: str) -> tuple[list[str], dict[str, int], list[tuple[str, int]]]:
    classes, class_to_idx = find_classes(root)
    return classes, class_to_idx, make_dataset(root, class_to_idx, IMG_EXTENSIONS)


def on_rank0(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, its result (or its error, re-raised as FileNotFoundError) sent to every rank; just fn()
    without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except (OSError, RuntimeError) as e:
            box = [("error", str(e).splitlines()[0] if str(e) else type(e).__name__)]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise FileNotFoundError(value)
    return value


class ScannedImageFolder(ImageFolder):
    """torchvision's ImageFolder (same classes, same sample order) whose directory walk runs on rank 0 only."""

    def find_classes(self, directory: str):
        classes, class_to_idx, self._scanned = on_rank0(lambda: scan(directory))
        return classes, class_to_idx

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return self._scanned

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        sample = load(path, self.transform, path)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target
