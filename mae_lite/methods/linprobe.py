"""Linear probing as a method: a frozen encoder, and BatchNorm (no affine) + linear head trained on its features.

As facebookresearch/mae's `main_linprobe.py`: the network's `head` becomes
`Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear(D, classes))` with the linear weight drawn
from trunc-normal(0.01); every other parameter is frozen. Unlike MAE's script (its issue #54), the
encoder stays in eval mode while the head trains, so dropout or drop-path in the encoder never act.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def attach_probe_head(net: nn.Module, num_classes: int) -> nn.Module:
    """Replace `net.head` by the probe head and freeze everything else; returns `net`."""
    dim = getattr(net, "num_features", None) or net.embed_dim
    net.head = probe_head(dim, num_classes)
    for name, p in net.named_parameters():
        p.requires_grad = name.startswith("head.")
    return net


class LinearProbe(nn.Module):
    """`forward(images, target) -> (loss, {})` in training (encoder under no_grad), logits in eval mode.
    The network (with its probe head) is `.model` (checkpoint keys `model.*`)."""

    def __init__(self, model: nn.Module, criterion: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.criterion = criterion or nn.CrossEntropyLoss()

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.model.eval()  # the frozen encoder never leaves eval mode
        self.model.head.train(mode)
        return self

    def forward(self, images: torch.Tensor, target: Optional[torch.Tensor] = None):
        if not self.training:
            return self.model(images)
        with torch.no_grad():
            feats = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        return self.criterion(self.model.head(feats), target), {}
