"""JPEG decoding on the device (`decode_on_device=True`): loader workers only read the file's bytes and draw the
crop / flip / interpolation (the same draw as the CPU path); the recipe's `device_batch` decodes the whole batch
with one `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on CUDA, libjpeg-turbo on the CPU) and crops,
resizes (antialiased) and flips each image with decode.py's `crop_resize`, the CPU path's own call.

The worker's collate packs a batch's JPEG bytes into one tensor + offsets (EncodedBatch), so that a batch crosses
from the worker to the main process as a few shared-memory blocks, not one per image. Files that are not plain RGB /
greyscale JPEGs (PNG, CMYK...) take the CPU path in the worker and travel as uint8 tensors in the same batch. A JPEG
the device decoder refuses becomes a BadImage, as on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from PIL import Image
from torch.utils.data import get_worker_info
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


@dataclass
class EncodedBatch:
    """A collated decode_on_device batch. The JPEGs' bytes travel back to back in one uint8 tensor (one shared-memory
    block from a loader worker instead of one per image: per-image tensors capped the loader at ~2k items/s);
    everything else is plain Python. Item k of the batch is JPEG j = `kinds[k]` (>= 0) or decoded[-kinds[k] - 1]."""

    data: torch.Tensor  # uint8 [total bytes]: JPEG j is data[offsets[j]:offsets[j + 1]]
    offsets: torch.Tensor  # int64 [n_jpegs + 1]
    kinds: list[int]  # per batch item: its JPEG's index, or -1 - its index in `decoded`
    boxes: list[tuple[int, int, int, int]]  # per JPEG, as EncodedImage
    flips: list[bool]
    interpolations: list[str]
    sizes: list[int]
    sources: list[str]
    decoded: list[torch.Tensor]  # uint8 [3, H, W] items the worker decoded itself (PNG, CMYK...: rare)

    def __len__(self) -> int:
        return len(self.kinds)

    def pin_memory(self) -> "EncodedBatch":
        """Called by the DataLoader's pin thread (torch pins objects through their own `pin_memory`). The decoders
        read the bytes on the host, so pinning them would be a wasted copy; the decoded items are copied to the
        device and get pinned, as they were in a list."""
        if not self.decoded:
            return self
        return replace(self, decoded=[x.pin_memory() for x in self.decoded])


def _byte_buffer(n: int) -> torch.Tensor:
    """An uninitialised uint8 [n]; in a loader worker in shared memory, as default_collate does, so that sending it
    to the main process copies nothing."""
    if get_worker_info() is None or n == 0:
        return torch.empty(n, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))


def pack(images: Sequence[Any]) -> EncodedBatch:
    """EncodedImage / uint8 tensor items (in batch order) as one EncodedBatch."""
    kinds, jpegs, decoded = [], [], []
    for x in images:
        if isinstance(x, EncodedImage):
            kinds.append(len(jpegs))
            jpegs.append(x)
        else:
            kinds.append(-1 - len(decoded))
            decoded.append(x)
    lengths = [e.data.numel() for e in jpegs]
    offsets = torch.zeros(len(jpegs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    data = _byte_buffer(sum(lengths))
    if jpegs:
        torch.cat([e.data for e in jpegs], out=data)
    return EncodedBatch(data, offsets, kinds, [tuple(e.box) for e in jpegs], [e.flip for e in jpegs],
                        [e.interpolation for e in jpegs], [e.size for e in jpegs], [e.source for e in jpegs], decoded)


def collate_encoded(items: Sequence[tuple[Any, Any]]):
    """Batches with EncodedImage items pack the images into an EncodedBatch (decoded by `decode_batch`); others as
    usual."""
    if not any(isinstance(item[0], EncodedImage) for item in items):
        return default_collate(items)
    return pack([item[0] for item in items]), default_collate([item[1] for item in items])


def is_encoded_batch(images: Any) -> bool:
    return isinstance(images, EncodedBatch)


def _decode(data: list[torch.Tensor], device: torch.device) -> list:
    """decode_jpeg on a list in one call; if the batch fails, image by image (the error where the decoder refuses)."""
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


def decode_batch(batch: EncodedBatch | Sequence[Any], device: torch.device) -> tuple[torch.Tensor, list[BadImage]]:
    """uint8 [B, 3, size, size] on `device` from an EncodedBatch (or a list of EncodedImage / uint8 tensors); a JPEG
    the decoder refuses is listed as bad and its slot filled with a copy of another image of the batch."""
    if not isinstance(batch, EncodedBatch):
        batch = pack(batch)
    n_jpegs = len(batch.boxes)
    offsets = batch.offsets.tolist()  # one host read, not two per image
    decoded = _decode([batch.data[offsets[j]:offsets[j + 1]] for j in range(n_jpegs)], device) if n_jpegs else []
    out: list = [None] * len(batch)
    bad: list[BadImage] = []
    for k, j in enumerate(batch.kinds):
        if j < 0:
            out[k] = batch.decoded[-1 - j].to(device, non_blocking=True)
        elif isinstance(decoded[j], Exception):
            bad.append(bad_item(batch.sources[j] or f"batch item {k}", decoded[j]))
        else:
            out[k] = crop_resize(decoded[j], batch.boxes[j], batch.sizes[j], batch.interpolations[j], batch.flips[j])
    good = [x for x in out if x is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8, device=device), bad
    out = [x if x is not None else good[k % len(good)] for k, x in enumerate(out)]
    return torch.stack(out), bad
