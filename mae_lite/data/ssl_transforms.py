"""MoCo-v3's two asymmetric views (BYOL's augmentation; the original's `ssl_transform`, fact sheet 6).

Both views: RandomResizedCrop(scale 0.08-1) -> ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 -> Gaussian
blur, sigma in [0.1, 2.0] px (p 1.0 on view 1, 0.1 on view 2) -> RandomGrayscale 0.2 -> horizontal flip
-> solarisation p 0.2 (view 2 only) -> ToTensor -> Normalize. A dataset item becomes
`((view1, view2), label)`. With `output="uint8"` (the recipe's) the crop is the fast one of decode.py (same
distribution) and the views end as uint8 tensors, normalised on the device by the recipe.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from torchvision import transforms as T

from .decode import FastRandomResizedCrop

BLUR_SIGMA = (0.1, 2.0)


class TwoViews:
    """Applies two transforms to the same image and returns the pair `(t1(img), t2(img))`."""

    def __init__(self, t1: Callable, t2: Callable):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)

    def __repr__(self) -> str:
        return f"TwoViews(\n  view1={self.t1},\n  view2={self.t2})"


def blur_kernel(img_size: int, sigma_max: float = BLUR_SIGMA[1]) -> int:
    """An odd kernel covering +-3 sigma_max: the original blurs with PIL (sigma in pixels, no kernel size);
    kept below twice the image side so reflect padding works on tiny images."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    return min(k, 2 * img_size - 1)


def ssl_view(img_size: int, blur_p: float, solarize_p: float, scale: Sequence[float] = (0.08, 1.0),
             mean: Sequence[float] = (0.485, 0.456, 0.406),
             std: Sequence[float] = (0.229, 0.224, 0.225), output: str = "float") -> T.Compose:
    """One view's augmentation (bilinear RandomResizedCrop, as torchvision's default the original uses)."""
    blur = T.GaussianBlur(blur_kernel(img_size), sigma=BLUR_SIGMA)
    crop = (FastRandomResizedCrop(img_size, scale, interpolation="bilinear", hflip=0.0, output="pil")
            if output == "uint8" else T.RandomResizedCrop(img_size, scale=tuple(scale)))
    tf = [crop,
          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
          blur if blur_p >= 1.0 else T.RandomApply([blur], p=blur_p),
          T.RandomGrayscale(p=0.2),
          T.RandomHorizontalFlip()]
    if solarize_p > 0:
        tf.append(T.RandomSolarize(128, p=solarize_p))  # PIL's ImageOps.solarize threshold, as the original
    if output == "uint8":
        return T.Compose([*tf, T.PILToTensor()])
    return T.Compose([*tf, T.ToTensor(), T.Normalize(mean, std)])


def ssl_transform(img_size: int = 224, scale: Sequence[float] = (0.08, 1.0),
                  mean: Sequence[float] = (0.485, 0.456, 0.406),
                  std: Sequence[float] = (0.229, 0.224, 0.225), output: str = "float") -> TwoViews:
    """The asymmetric pair: view 1 always blurred, never solarised; view 2 blurred 10%, solarised 20%.
    (Both views crop the same decoded image, so it is decoded once at full size: no DCT scaling here.)"""
    return TwoViews(ssl_view(img_size, 1.0, 0.0, scale, mean, std, output),
                    ssl_view(img_size, 0.1, 0.2, scale, mean, std, output))
