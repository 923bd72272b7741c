"""Semantic FPN on a plain ViT (the original's ADE20K transfer, fact sheet 4.13), without mmcv/mmseg.

Pieces, in mmseg's terms: the ViT backbone's token maps after blocks `out_indices` (no final norm, as mmseg's
`MAE` backbone with `final_norm=False`), the original's `Feature2Pyramid_Scale` neck (x4, x2, x1, x0.5 to
`embed_dim * scale_factor` channels) and mmseg's `FPNHead` (per level 3x3 conv-BN-ReLU stages with x2 bilinear
upsampling down to stride 4, summed, Dropout2d, 1x1 classifier). The backbone is any ViT with the public
attributes `patch_embed` (timm's, with `.proj`), `cls_token`, `pos_embed` and `blocks`: ours or timm's.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pos_embed import resize_pos_embed

RESCALES = (4, 2, 1, 0.5)
FEATURE_STRIDES = (4, 8, 16, 32)  # FPNHead's: the neck's outputs at x4 ... x0.5 of a stride-16 token grid


def vit_feature_maps(vit: nn.Module, images: torch.Tensor, out_indices: Sequence[int]) -> list[torch.Tensor]:
    """Patch-token maps [B, C, h, w] after each block in `out_indices` (in that order). The learned position
    embedding is resized bicubically when the patch grid differs from its own (crops smaller than the training
    size); the patch embedding's conv runs directly so that any image size works."""
    x = vit.patch_embed.proj(images)
    B, C, h, w = x.shape
    x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))
    pos = vit.pos_embed
    n_prefix = pos.shape[1] - math.prod(vit.patch_embed.grid_size)
    if tuple(vit.patch_embed.grid_size) != (h, w):
        pos = resize_pos_embed(pos, (h, w), num_prefix=n_prefix)
    x = torch.cat([vit.cls_token.expand(B, -1, -1), x], dim=1) + pos
    wanted, maps = set(out_indices), {}
    for i, blk in enumerate(vit.blocks):
        x = blk(x)
        if i in wanted:
            maps[i] = x[:, n_prefix:].transpose(1, 2).reshape(B, C, h, w)
    return [maps[i] for i in out_indices]


class Feature2PyramidScale(nn.Module):
    """The original's `Feature2Pyramid_Scale(embed_dim, rescales=[4, 2, 1, 0.5], scale_factor)`: x4 is
    deconv-BN-GELU-deconv, x2 one deconv, x1 a 1x1 conv, x0.5 a 1x1 conv then 2x2 max-pool; all to
    int(embed_dim * scale_factor) channels (48 for ViT-Tiny)."""

    def __init__(self, embed_dim: int, scale_factor: float = 0.25, norm=nn.BatchNorm2d):
        super().__init__()
        out = int(embed_dim * scale_factor)
        self.out_channels = out
        self.upsample_4x = nn.Sequential(nn.ConvTranspose2d(embed_dim, out, 2, stride=2), norm(out), nn.GELU(),
                                         nn.ConvTranspose2d(out, out, 2, stride=2))
        self.upsample_2x = nn.ConvTranspose2d(embed_dim, out, 2, stride=2)
        self.identity = nn.Conv2d(embed_dim, out, 1)
        self.downsample_2x = nn.Sequential(nn.Conv2d(embed_dim, out, 1), nn.MaxPool2d(2, stride=2))

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != 4:
            raise ValueError(f"the neck takes 4 feature maps (one per out_index), got {len(maps)}")
        ops = (self.upsample_4x, self.upsample_2x, self.identity, self.downsample_2x)
        return [op(x) for op, x in zip(ops, maps)]


def conv_bn_relu(cin: int, cout: int, norm=nn.BatchNorm2d) -> nn.Sequential:
    """mmcv's ConvModule(3x3, padding 1, norm, ReLU): no conv bias under a norm; Kaiming (fan_out) init."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, norm(cout), nn.ReLU(inplace=True))


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class FPNHead(nn.Module):
    """mmseg's `FPNHead`: level i gets max(1, log2(stride_i / stride_0)) conv-BN-ReLU stages, each followed by a
    x2 bilinear upsampling for levels coarser than the first; the levels are summed (each resized to level 0's
    size), then Dropout2d and a 1x1 classifier (normal(0.01) init). Output: logits at level 0's resolution."""

    def __init__(self, in_channels: Sequence[int], channels: int = 128, num_classes: int = 150,
                 dropout: float = 0.1, strides: Sequence[int] = FEATURE_STRIDES, norm=nn.BatchNorm2d):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for i, (cin, stride) in enumerate(zip(in_channels, strides)):
            n = max(1, int(math.log2(stride) - math.log2(strides[0])))
            layers: list[nn.Module] = []
            for k in range(n):
                layers.append(conv_bn_relu(cin if k == 0 else channels, channels, norm))
                if stride != strides[0]:
                    layers.append(Upsample2x())
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](feats[0])
        for head, x in zip(self.scale_heads[1:], feats[1:]):
            out = out + F.interpolate(head(x), size=out.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(out))


class SemanticFPN(nn.Module):
    """ViT backbone + Feature2PyramidScale + FPNHead. `forward(images)` -> logits at 1/4 of the token grid's
    stride-16 resolution (stride patch_size / 4); `segment(images)` -> logits resized to the image (mmseg's
    `encode_decode`). Keys: `backbone.*` (the ViT's own), `neck.*`, `head.*`."""

    def __init__(self, backbone: nn.Module, out_indices: Sequence[int] = (3, 5, 7, 11), scale_factor: float = 0.25,
                 channels: int = 128, num_classes: int = 150, dropout: float = 0.1, norm=nn.BatchNorm2d):
        super().__init__()
        depth = len(backbone.blocks)
        if len(out_indices) != 4 or not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices must be 4 block indices in 0..{depth - 1}, got {tuple(out_indices)}")
        self.backbone, self.out_indices = backbone, tuple(out_indices)
        self.neck = Feature2PyramidScale(backbone.embed_dim, scale_factor, norm)
        self.head = FPNHead([self.neck.out_channels] * 4, channels, num_classes, dropout, norm=norm)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(vit_feature_maps(self.backbone, images, self.out_indices)))

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self(images), size=images.shape[2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def slide_inference(net: SemanticFPN, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg's `slide_inference`: logits [B, classes, H, W] averaged over crop x crop windows taken every `stride`
    pixels (the last window flush with the border; windows shrink to the image where it is smaller)."""
    B, _, H, W = image.shape
    rows = max(H - crop + stride - 1, 0) // stride + 1
    cols = max(W - crop + stride - 1, 0) // stride + 1
    logits = image.new_zeros((B, net.num_classes, H, W), dtype=torch.float32)
    count = image.new_zeros((1, 1, H, W), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, H), min(c * stride + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[:, :, y1:y2, x1:x2] += net.segment(image[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count
