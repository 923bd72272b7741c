"""The CPU decode path: crop parameters drawn on the original size, JPEGs decoded at a reduced DCT scale when the
crop still covers the output size at that scale (PIL `draft`: libjpeg-turbo's scaled IDCT), crop + antialiased resize
+ flip in one call on the uint8 tensor (torch's vectorised uint8 kernels: 3-4x faster than PIL's resample; the same
call runs on a GPU in gpu_decode.py); uint8 CHW tensors out, normalised later on the device.

The crop distribution is RandomResizedCrop's (torchvision / timm `get_params`), drawn with Python's `random`,
which DataLoader seeds in every worker.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, JpegImagePlugin
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
TV_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                     "nearest": InterpolationMode.NEAREST}
RANDOM_INTERPOLATIONS = ("bilinear", "bicubic")  # interpolation="random", as timm
DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg decodes at directly


def sample_crop(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """(top, left, h, w): RandomResizedCrop's parameters (area fraction uniform in `scale`, log aspect ratio uniform
    in log `ratio`, 10 tries, then the whole image clamped to `ratio`)."""
    rng = rng or random
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def is_lazy_jpeg(img: Image.Image) -> bool:
    """A JPEG opened but not decoded yet (so that `draft` can still pick a DCT scale)."""
    return isinstance(img, JpegImagePlugin.JpegImageFile) and len(getattr(img, "tile", ())) == 1


def dct_scale(box_w: float, box_h: float, out_w: int, out_h: int) -> int:
    """The largest DCT reduction (8, 4, 2, 1) at which a box_w x box_h region keeps at least out_w x out_h pixels,
    so that the resample after it only ever shrinks (the quality of a full decode)."""
    limit = min(box_w / out_w, box_h / out_h)
    return next((s for s in DCT_SCALES if s <= limit), 1)


def decode(img: Image.Image, scale: int = 1) -> tuple[torch.Tensor, float]:
    """An opened image as a uint8 [C, H, W] tensor (C = 3, or 1 for greyscale JPEGs), decoded at 1/`scale` of its size
    when it is a JPEG not decoded yet; returns the tensor and the reduction actually used (1 if none)."""
    f = 1.0
    if scale > 1 and is_lazy_jpeg(img):
        width, height = img.size
        res = img.draft(img.mode, (width // scale, height // scale))
        if res is not None:  # width // (width // s) lies in [s, 2s), so draft picks s itself
            f = width / res[1][2]
    if img.mode not in ("RGB", "L"):  # P, RGBA, CMYK, I;16...: RGB first, as the RGB loader did
        img = img.convert("RGB")
    a = np.array(img, dtype=np.uint8, copy=True)
    x = torch.from_numpy(a[:, :, None] if a.ndim == 2 else a).permute(2, 0, 1)  # channels-last strides: fast resize
    return x, f


def crop_resize(x: torch.Tensor, box: tuple[int, int, int, int], size: int, interpolation: str,
                flip: bool = False) -> torch.Tensor:
    """The (top, left, h, w) region of a uint8 [C, H, W] tensor resized to size x size with antialiasing (torch's
    vectorised uint8 kernels on the CPU; the same call on a GPU), flipped; 3 channels out."""
    top, left, h, w = box
    out = TF.resized_crop(x, top, left, h, w, [size, size], interpolation=TV_INTERPOLATIONS[interpolation],
                          antialias=True)
    if flip:
        out = out.flip(-1)
    return out.expand(3, -1, -1) if out.shape[-3] == 1 else out


def scaled_box(box: tuple[int, int, int, int], f: float, x: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, h, w) in original pixels mapped to an image decoded at 1/f, rounded, kept inside it."""
    if f == 1.0:
        return box
    top, left = int(round(box[0] / f)), int(round(box[1] / f))
    h = max(1, min(int(round(box[2] / f)), x.shape[-2] - top))
    w = max(1, min(int(round(box[3] / f)), x.shape[-1] - left))
    return top, left, h, w


def resample_pil(img: Image.Image, box: tuple[int, int, int, int], size: int, interpolation: str,
                 draft: bool = True) -> Image.Image:
    """The PIL form of decode + crop_resize, for PIL augmentations that follow (RandAugment, colour jitter): one
    resample of the box (PIL reads the pixels around it for the filter support), RGB."""
    top, left, h, w = box
    s = dct_scale(w, h, size, size) if draft else 1
    width = img.size[0]
    if s > 1 and is_lazy_jpeg(img):
        res = img.draft(img.mode, (img.size[0] // s, img.size[1] // s))
        if res is not None:
            f = width / res[1][2]
            top, left, h, w = top / f, left / f, h / f, w / f
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    out = img.resize((size, size), INTERPOLATIONS[interpolation], box=(left, top, left + w, top + h))
    return out if out.mode == "RGB" else out.convert("RGB")


def to_float_normalised(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std: ToTensor + Normalize, on any device."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.float() / 255.0 - m) / s


class FastRandomResizedCrop:
    """RandomResizedCrop + horizontal flip, decoding at a DCT scale when the crop allows it.

    `output`: "uint8" (CHW tensor), "float" (ToTensor + Normalize with `mean`/`std`: the float path, for tests and
    for transforms that continue on float tensors) or "pil" (for PIL augmentations that follow: RandAugment...).
    `last_params` keeps the last draw (top, left, h, w, flip, interpolation) for tests."""

    takes_lazy = True  # accepts an opened, not yet decoded image (datasets then skip their RGB conversion)

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 interpolation: str = "random", hflip: float = 0.5, output: str = "uint8", draft: bool = True,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        if interpolation != "random" and interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be random, bilinear, bicubic or nearest, got {interpolation!r}")
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.interpolation, self.hflip, self.output, self.draft = interpolation, float(hflip), output, draft
        self.mean, self.std = tuple(mean), tuple(std)
        self.last_params: Optional[tuple] = None

    def params(self, width: int, height: int) -> tuple[int, int, int, int, bool, str]:
        """One draw: (top, left, h, w, flip, interpolation)."""
        top, left, h, w = sample_crop(width, height, self.scale, self.ratio)
        interp = random.choice(RANDOM_INTERPOLATIONS) if self.interpolation == "random" else self.interpolation
        flip = self.hflip > 0 and random.random() < self.hflip
        return top, left, h, w, flip, interp

    def apply(self, img: Image.Image, params: tuple[int, int, int, int, bool, str]):
        top, left, h, w, flip, interp = params
        if self.output == "pil":
            out = resample_pil(img, (top, left, h, w), self.size, interp, self.draft)
            return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out
        x, f = decode(img, dct_scale(w, h, self.size, self.size) if self.draft else 1)
        out = crop_resize(x, scaled_box((top, left, h, w), f, x), self.size, interp, flip)
        return out if self.output == "uint8" else to_float_normalised(out, self.mean, self.std)

    def __call__(self, img: Image.Image):
        self.last_params = self.params(*img.size)
        return self.apply(img, self.last_params)

    def __repr__(self) -> str:
        return (f"FastRandomResizedCrop(size={self.size}, scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}, "
                f"interpolation={self.interpolation}, hflip={self.hflip}, output={self.output}, draft={self.draft})")


class ResizeCenterCrop:
    """Resize(shorter side to int(size / crop_pct)) + CenterCrop(size) on the decoded uint8 tensor (torchvision's
    two steps; antialiased like PIL's), decoding at a DCT scale while the decoded image stays at least as
    large as the resized one. `output`: "uint8" or "float" (ToTensor + Normalize)."""

    takes_lazy = True

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic", output: str = "uint8",
                 draft: bool = True, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.size, self.resize_to = int(size), int(size / crop_pct)
        self.interpolation, self.output, self.draft = interpolation, output, draft
        self.mean, self.std = tuple(mean), tuple(std)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(new_h, new_w) as torchvision's Resize(int): the shorter side to resize_to, the longer truncated."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_to, int(self.resize_to * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, img: Image.Image):
        new_h, new_w = self.resized_size(*img.size)
        x, _ = decode(img, dct_scale(img.size[0], img.size[1], new_w, new_h) if self.draft else 1)
        x = TF.resize(x, [new_h, new_w], interpolation=TV_INTERPOLATIONS[self.interpolation], antialias=True)
        out = TF.center_crop(x, [self.size, self.size])
        out = out.expand(3, -1, -1) if out.shape[-3] == 1 else out
        return out if self.output == "uint8" else to_float_normalised(out, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"ResizeCenterCrop(size={self.size}, resize_to={self.resize_to}, interpolation={self.interpolation}, "
                f"output={self.output}, draft={self.draft})")
