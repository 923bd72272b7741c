"""MAE pre-training as a method: the masked-autoencoder loss of a batch; labels are ignored."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..models.mae import MaskedAutoencoderViT


class MAE(nn.Module):
    """`forward(images, target=None) -> (loss, {})`; the network is `.model` (checkpoint keys `model.*`)."""

    def __init__(self, model: MaskedAutoencoderViT, mask_ratio: float = 0.75):
        super().__init__()
        self.model, self.mask_ratio = model, mask_ratio

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None):
        loss = self.model(images, self.mask_ratio)[0]
        return loss, {}

    def save_visuals(self, images: torch.Tensor, path: str | Path, mean: Sequence[float], std: Sequence[float]) -> Path:
        from ..analysis.reconstruct import save_reconstruction_grid

        return save_reconstruction_grid(self.model, images, path, mean, std, self.mask_ratio)
