"""Supervised classification as a method: fine-tuning and training from scratch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class Classify(nn.Module):
    """`forward(images, target) -> (loss, {})` in training, with optional timm Mixup/CutMix on the batch;
    logits in eval mode. The network is `.model` (checkpoint keys `model.*`)."""

    def __init__(self, model: nn.Module, criterion: nn.Module, mixup: Optional[object] = None):
        super().__init__()
        self.model, self.criterion, self.mixup = model, criterion, mixup

    def forward(self, images: torch.Tensor, target: Optional[torch.Tensor] = None):
        if not self.training:
            return self.model(images)
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        return self.criterion(self.model(images), target), {}
