"""Semantic segmentation as a method: per-pixel cross-entropy of a segmentor's logits, as mmseg's decode head."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = 255


def seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mmseg's CrossEntropyLoss (avg_non_ignore=False): logits resized (bilinear) to the label map, per-pixel CE
    with ignored pixels counting 0, averaged over *all* pixels (ignored ones included)."""
    logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").sum() / target.numel()


class Segment(nn.Module):
    """`forward(images, target) -> (loss, logs)` in training (logs: `acc_seg`, the pixel accuracy over labelled
    pixels, as mmseg logs it); in eval mode `forward(images)` returns logits at the image size. The network is
    `.model` (keys `model.*`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None):
        if target is None:
            return self.model.segment(images)
        logits = self.model(images)
        loss = seg_loss(logits, target)
        with torch.no_grad():
            up = F.interpolate(logits.detach().float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            valid = target != IGNORE_INDEX
            acc = 100.0 * ((up.argmax(1) == target) & valid).sum() / valid.sum().clamp(min=1)
        return loss, {"acc_seg": acc}
