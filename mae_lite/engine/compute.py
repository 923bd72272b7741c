"""Compute accounting: FLOPs per image (counted once, on a run's first step), images seen, device-hours.

Every run logs and stores (checkpoint key "compute") what it cost next to what it reached, so results
can be compared at equal compute; a resumed run adds to the numbers of the checkpoint it resumes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _sdpa_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


def extra_flop_formulas() -> dict:
    """CPU SDPA runs as `_scaled_dot_product_flash_attention_for_cpu`, which FlopCounterMode does not know;
    count it like the CUDA kernels, so SDPA and explicit attention give the same FLOPs."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd}


def flop_counter() -> FlopCounterMode:
    """Counts the FLOPs of the matrix products (and attention) run inside it, forward and backward."""
    return FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())


@dataclass
class Compute:
    flops_per_image: Optional[float] = None  # forward + backward of one training image (optimizer not counted)
    images: int = 0  # training images processed, all processes together
    seconds: float = 0.0  # wall time of the training steps (data waits included, evaluation not)
    device_hours: float = 0.0  # seconds x processes / 3600
    world_size: int = 1
    device: str = "cpu"

    @property
    def total_flops(self) -> float:
        return (self.flops_per_image or 0.0) * self.images

    def add(self, images: int, seconds: float, world_size: int) -> None:
        self.images += images
        self.seconds += seconds
        self.device_hours += seconds * world_size / 3600
        self.world_size = world_size

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_flops": self.total_flops}

    @classmethod
    def from_state(cls, state: Optional[dict[str, Any]]) -> "Compute":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in (state or {}).items() if k in fields})

    def summary(self) -> str:
        per_image = f"{self.flops_per_image / 1e9:.3g} GFLOP per image" if self.flops_per_image else "FLOPs not counted"
        return (f"{per_image} (forward + backward), {self.images} images, {self.total_flops / 1e15:.4g} PFLOP, "
                f"{self.device_hours:.4g} {self.device}-hours over {self.world_size} process(es)")
