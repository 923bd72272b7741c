"""Image transforms built from timm and torchvision parts."""
from __future__ import annotations

from typing import Optional, Sequence

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


def finetune_transform(img_size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                       color_jitter: Optional[float], auto_augment: Optional[str], interpolation: str,
                       re_prob: float, re_mode: str, re_count: int, mean: Sequence[float], std: Sequence[float]):
    """timm's ImageNet training transform (RandomResizedCrop, flip, RandAugment, colour jitter (off under
    RandAugment, as in the original), random erasing)."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
                            color_jitter=color_jitter, auto_augment=auto_augment, interpolation=interpolation,
                            re_prob=re_prob, re_mode=re_mode, re_count=re_count, mean=tuple(mean), std=tuple(std))


def eval_transform(img_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic",
                   mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
    """Resize(img_size / crop_pct) + CenterCrop(img_size): 256 + 224 at ImageNet size."""
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    return T.Compose([T.Resize(int(img_size / crop_pct), interpolation=interp), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(mean, std)])
