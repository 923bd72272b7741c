"""Object detection / instance segmentation as a method: a torchvision Mask R-CNN trained by the one loop."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class Detect(nn.Module):
    """`forward(images, targets) -> (loss, logs)` in training, the sum of Mask R-CNN's five losses with
    each part logged (`loss_objectness`, `loss_rpn_box_reg`, `loss_classifier`, `loss_box_reg`,
    `loss_mask`); in eval mode the detections (a dict of boxes, labels, scores, masks per image).
    `images` is a list of [3, h, w] tensors in [0, 1]. The network is `.model` (keys `model.*`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: list[torch.Tensor], targets: Optional[list[dict[str, torch.Tensor]]] = None):
        if not self.training:
            return self.model(images)
        losses = self.model(images, targets)
        loss = torch.stack([v.float() for v in losses.values()]).sum()
        return loss, {k: v.detach() for k, v in losses.items()}
