"""JPEG decoding on the device (`decode_on_device=True`): loader workers only read the file's bytes and draw the
crop / flip / interpolation (the same draw as the CPU path); the recipe's `device_batch` decodes the whole batch
with one `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on CUDA, libjpeg-turbo on the CPU) and crops,
resizes (antialiased) and flips each image with decode.py's `crop_resize`, the CPU path's own call.

Files that are not plain RGB / greyscale JPEGs (PNG, CMYK...) take the CPU path in the worker and travel as uint8
tensors in the same batch. A JPEG the device decoder refuses becomes a BadImage, as on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from torch.utils.data._utils.collate import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from .bad_images import BadImage, bad_item
from .decode import FastRandomResizedCrop, crop_resize, is_lazy_jpeg


@dataclass
class EncodedImage:
    """A JPEG's bytes and the augmentation drawn for it (box in original pixels: top, left, h, w)."""

    data: torch.Tensor  # uint8 [n_bytes]
    box: tuple[int, int, int, int]
    flip: bool
    interpolation: str
    size: int
    source: str = ""


def read_bytes(img: Image.Image) -> torch.Tensor:
    """The encoded bytes behind an opened (not decoded) image, as a uint8 tensor; closes the image."""
    fp = img.fp
    fp.seek(0)
    data = fp.read()
    img.close()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class DeviceDecodeCrop(FastRandomResizedCrop):
    """The pre-training crop + flip for `decode_on_device`: an EncodedImage for a plain JPEG, the CPU path's uint8
    tensor for anything else."""

    def __call__(self, img: Image.Image):
        if not is_lazy_jpeg(img) or img.mode not in ("RGB", "L"):
            return super().__call__(img)
        top, left, h, w, flip, interp = self.last_params = self.params(*img.size)
        source = getattr(img, "filename", "") or ""
        return EncodedImage(read_bytes(img), (top, left, h, w), flip, interp, self.size, str(source))


def collate_encoded(items: Sequence[tuple[Any, Any]]):
    """Batches with EncodedImage items keep the images as a list (decoded by `decode_batch`); others as usual."""
    if not any(isinstance(item[0], EncodedImage) for item in items):
        return default_collate(items)
    return [item[0] for item in items], default_collate([item[1] for item in items])


def is_encoded_batch(images: Any) -> bool:
    return isinstance(images, list) and any(isinstance(x, EncodedImage) for x in images)


def _decode(data: list[torch.Tensor], device: torch.device) -> list:
    """decode_jpeg on a list in one call; if the batch fails, image by image (None where the decoder refuses)."""
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                out.append(e)
        return out


def decode_batch(items: list, device: torch.device) -> tuple[torch.Tensor, list[BadImage]]:
    """uint8 [B, 3, size, size] on `device` from a list of EncodedImage / uint8 tensors; a JPEG the decoder refuses
    is listed as bad and its slot filled with a copy of another image of the batch."""
    enc = [k for k, x in enumerate(items) if isinstance(x, EncodedImage)]
    decoded = _decode([items[k].data for k in enc], device) if enc else []
    out: list = [None] * len(items)
    bad: list[BadImage] = []
    for k, img in zip(enc, decoded):
        e = items[k]
        if isinstance(img, Exception):
            bad.append(bad_item(e.source or f"batch item {k}", img))
        else:
            out[k] = crop_resize(img, e.box, e.size, e.interpolation, e.flip)
    for k, x in enumerate(items):
        if not isinstance(x, EncodedImage):
            out[k] = x.to(device, non_blocking=True)
    good = [x for x in out if x is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8, device=device), bad
    out = [x if x is not None else good[k % len(good)] for k, x in enumerate(out)]
    return torch.stack(out), bad
