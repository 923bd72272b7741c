"""Image transforms built from timm and torchvision parts.

`output="uint8"` (what the recipes use): loader workers return uint8 CHW tensors through the fast decode path
(decode.py) and the recipe's `device_batch` normalises them on the device (random erasing of fine-tuning too);
`output="float"`: normalised float tensors in the worker, as before (timm's / torchvision's transforms for
fine-tuning and evaluation, the fast crop for pre-training).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torchvision import transforms as T

from .decode import FastRandomResizedCrop, ResizeCenterCrop

OUTPUTS = ("uint8", "float")


class Pipeline(T.Compose):
    """A Compose whose first step takes an opened, not yet decoded image (so JPEGs can be decoded at a DCT scale)."""

    takes_lazy = True


def pretrain_transform(img_size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                       interpolation: str = "random", hflip: float = 0.5,
                       mean: Sequence[float] = (0.485, 0.456, 0.406),
                       std: Sequence[float] = (0.229, 0.224, 0.225), output: str = "float") -> FastRandomResizedCrop:
    """MAE-Lite pre-training augmentation: RandomResizedCrop (random bilinear/bicubic) + flip only."""
    _check(output)
    return FastRandomResizedCrop(img_size, scale, ratio, interpolation, hflip, output=output, mean=mean, std=std)


def finetune_transform(img_size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                       color_jitter: Optional[float], auto_augment: Optional[str], interpolation: str,
                       re_prob: float, re_mode: str, re_count: int, mean: Sequence[float], std: Sequence[float],
                       output: str = "float"):
    """timm's ImageNet training transform (RandomResizedCrop, flip, RandAugment, colour jitter (off under
    RandAugment, as in the original), random erasing). uint8: the fast crop + flip, timm's RandAugment / colour
    jitter on its PIL output, uint8 out; random erasing is left to the device (`erasing`), after normalisation,
    where timm's prefetching loader puts it too."""
    _check(output)
    if output == "float":
        from timm.data import create_transform

        return create_transform(img_size, is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
                                color_jitter=color_jitter, auto_augment=auto_augment, interpolation=interpolation,
                                re_prob=re_prob, re_mode=re_mode, re_count=re_count, mean=tuple(mean), std=tuple(std))
    from timm.data.transforms_factory import transforms_imagenet_train

    _, secondary, final = transforms_imagenet_train(img_size, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
                                                    color_jitter=color_jitter, auto_augment=auto_augment,
                                                    interpolation=interpolation, mean=tuple(mean), std=tuple(std),
                                                    use_prefetcher=True, separate=True)
    crop = FastRandomResizedCrop(img_size, scale, ratio, interpolation, hflip, output="pil")
    return Pipeline([crop, *secondary.transforms, *final.transforms])  # final: timm's MaybePILToTensor (uint8)


def erasing(re_prob: float, re_mode: str, re_count: int, device):
    """timm's RandomErasing for normalised float batches on `device` (None when off)."""
    if re_prob <= 0:
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=device)


def eval_transform(img_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic",
                   mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                   output: str = "float"):
    """Resize(img_size / crop_pct) + CenterCrop(img_size): 256 + 224 at ImageNet size."""
    _check(output)
    if output == "uint8":
        return ResizeCenterCrop(img_size, crop_pct, interpolation, output="uint8", mean=mean, std=std)
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    return T.Compose([T.Resize(int(img_size / crop_pct), interpolation=interp), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(mean, std)])


def _check(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
