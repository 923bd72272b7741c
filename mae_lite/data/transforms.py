"""Image transforms built from timm and torchvision parts."""
from __future__ import annotations

from typing import Sequence

from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T


def pretrain_transform(img_size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                       interpolation: str = "random", hflip: float = 0.5,
                       mean: Sequence[float] = (0.485, 0.456, 0.406),
                       std: Sequence[float] = (0.229, 0.224, 0.225)) -> T.Compose:
    """MAE-Lite pre-training augmentation: RandomResizedCrop (random bilinear/bicubic) + flip only."""
    tf = [RandomResizedCropAndInterpolation(img_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=interpolation)]
    if hflip > 0:
        tf.append(T.RandomHorizontalFlip(hflip))
    return T.Compose([*tf, T.ToTensor(), T.Normalize(mean, std)])
