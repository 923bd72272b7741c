"""Datasets by name, read from their standard on-disk layouts under `data_root`; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ..errors import UserError
from .demo import DemoPhotos
from .fashion_mnist import FashionMNIST
from .folder import ScannedImageFolder
from .transfer_sets import is_transfer_set, split_subfolder, transfer_set

IMAGENET_SPLITS = {"train": "imagenet_train", "eval": "imagenet_val"}


def _rgb_loader(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def image_folder(root: Path, transform: Optional[Callable], what: str) -> ImageFolder:
    """A class-per-sub-folder tree, with a one-line error that says what to put where."""
    if not root.is_dir():
        raise UserError(f"{what} not found: expected class sub-folders of images under {root}/ "
                        f"(e.g. {root}/n01440764/*.JPEG); put the data there or set data_root=..., "
                        "or try the embedded photos with dataset=demo")
    try:
        return ScannedImageFolder(str(root), transform=transform, loader=_rgb_loader)  # rank 0 scans; bad files skip
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{what} at {root} is not usable: {str(e).splitlines()[0]}") from None


def build_dataset(name: str, data_root: str, split: str, transform: Optional[Callable],
                  demo_samples: int = 2048, class_type: str = "") -> Dataset:
    """`name` is `ImageNet` (<data_root>/imagenet/imagenet_{train,val}), `demo` (the embedded photos),
    `FashionMNIST` (IDX files under <data_root>/fashion_mnist/ or Debian's /usr/share/datasets/fashion-mnist/),
    a transfer set (`CIFAR10`, `CIFAR100`, `Flowers`, `Pets`, `Aircraft`, `Cars`, `iNat2018`: see
    transfer_sets.py; `class_type` picks e.g. Aircraft's variant/family/manufacturer),
    `folder:<path>` (any class-per-sub-folder tree; one with train/ and val/ (or test/) sub-trees is split),
    or `wds:<folder or brace pattern>` (ssl_prepare's shards; a folder with train/ and val/ shard folders is split)."""
    if is_transfer_set(name):
        return transfer_set(name, data_root, split, transform, class_type)
    if name.lower() == "imagenet":
        return image_folder(Path(data_root) / "imagenet" / IMAGENET_SPLITS[split], transform, f"ImageNet {split} split")
    if name.lower() == "demo":
        return DemoPhotos(transform, samples_per_epoch=demo_samples)
    if name.lower() == "fashionmnist":
        return FashionMNIST(data_root, train=split == "train", transform=transform)
    if name.startswith("folder:"):
        return image_folder(split_subfolder(Path(name[len("folder:"):]), split), transform, "image folder")
    if name.startswith("wds:"):  # WebDataset shards written by ssl_prepare (shards.py)
        from .shards import open_shards

        return open_shards(name[len("wds:"):], split, transform)
    raise UserError(f"unknown dataset {name!r}: use ImageNet, demo, FashionMNIST, CIFAR10, CIFAR100, Flowers, Pets, "
                    "Aircraft, Cars, iNat2018, folder:<path to class sub-folders>, or wds:<ssl_prepare shards>")
