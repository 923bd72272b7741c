"""A loader batch made ready on the device: undecodable images accounted for, JPEGs decoded (decode_on_device),
uint8 images turned into normalised float32, all without synchronising with the host."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .bad_images import BadImageCounter, split_batch
from .decode import to_float_normalised
from .gpu_decode import decode_batch, is_encoded_batch


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors anywhere in a batch (a tensor, two views, a list of detection targets) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def normalise(obj: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """Every uint8 image tensor [..., 3, H, W] in `obj` (a tensor, or lists/tuples of them: MoCo's two views) as
    float32 (x / 255 - mean) / std; anything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return to_float_normalised(obj, mean, std) if obj.dtype == torch.uint8 else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(normalise(v, mean, std) for v in obj)
    return obj


def prepare(batch: Any, device: torch.device, counter: BadImageCounter, train: bool,
            mean: Sequence[float], std: Sequence[float], normalize: bool = True) -> tuple[Any, Any]:
    """(images, target) on `device`. Bad images go to `counter` (a training batch keeps its size: their slots hold
    copies of good items; an evaluation batch with one raises UserError)."""
    batch, bad = split_batch(batch)
    counter.add(bad, train)
    images, target = batch
    if images is None:
        raise counter.all_bad_batch()
    if is_encoded_batch(images):
        images, more = decode_batch(images, device)
        counter.add(more, train)
        if images.numel() == 0:
            raise counter.all_bad_batch()
    else:
        images = to_device(images, device)
    target = to_device(target, device)
    return (normalise(images, mean, std) if normalize else images), target
