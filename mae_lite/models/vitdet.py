"""ViTDet: our plain ViT as a detection backbone, its simple feature pyramid, and a torchvision Mask R-CNN.

As the original's detectron2 config (`mask_rcnn_vitdet_t_100ep.py`, fact sheet 4.12): window attention
(14x14 windows) in every block except the global ones (2, 5, 8, 11), decomposed relative position terms
(zero at the start) in every attention, the 14x14 pre-training position embedding (its cls position kept
in the state dict) bicubically resized to the patch grid on each forward, no cls token, no final norm.
The blocks are timm's ViTDet/SAM `Block`. Backbone keys equal detectron2's ViT (`patch_embed.proj`, `pos_embed`, `blocks.i.{norm1, attn.qkv,
attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2, mlp.fc1, mlp.fc2}`), so pre-trained ViT weights
load by name and `ssl_to_detectron2` only prepends `backbone.net.`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, PatchEmbed, trunc_normal_
from timm.models import vision_transformer_sam as sam
from torch.utils.checkpoint import checkpoint
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign


from .pos_embed import resize_pos_embed
from .vit import LayerNorm

GLOBAL_BLOCKS = (2, 5, 8, 11)  # ViT-Tiny/Small/Base: every third block attends globally


# ----- ViTDet's block: timm's SAM/ViTDet `Block` (window attention, decomposed relative positions) -----------
def window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> ([B * nh * nw, size, size, C], padded (Hp, Wp)); the bottom/right pad is zeros."""
    return sam.window_partition(x, size)


def window_unpartition(windows: torch.Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: windows back to [B, H, W, C], the padding cut off."""
    return sam.window_unpartition(windows, size, tuple(hw), tuple(padded))


def decomposed_rel_pos(q: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor,
                       q_hw: tuple[int, int], k_hw: tuple[int, int]) -> torch.Tensor:
    """ViTDet's attention bias [B, heads, Nq, Nk] = q . R_h[row offset] + q . R_w[column offset] for unscaled
    queries [B, heads, Nq, d] (timm's `get_decomposed_rel_pos_bias`, which takes heads folded into the batch)."""
    B, heads, n, d = q.shape
    bias = sam.get_decomposed_rel_pos_bias(q.reshape(B * heads, n, d), table_h.to(q.dtype), table_w.to(q.dtype),
                                           q_hw, k_hw)
    return bias.reshape(B, heads, n, -1)


def WindowBlock(dim: int, num_heads: int, grid: tuple[int, int], window: int = 0, mlp_ratio: float = 4.0,
                qkv_bias: bool = True, drop_path: float = 0.0, use_rel_pos: bool = True) -> nn.Module:
    """timm's ViTDet block on a [B, H, W, C] grid: attention inside `window` x `window` windows (the global
    `grid` when `window` is 0), zero-initialised `rel_pos_h` / `rel_pos_w` tables; detectron2's keys."""
    return sam.Block(dim, num_heads, mlp_ratio, qkv_bias, drop_path=drop_path, norm_layer=LayerNorm,
                     use_rel_pos=use_rel_pos, window_size=window, input_size=tuple(grid))


class ViTDetBackbone(nn.Module):
    """Plain ViT returning the last feature map [B, C, H/16, W/16]; `img_size` sizes the global blocks'
    relative-position tables, `pretrain_img_size` the learned position embedding (cls position kept)."""

    def __init__(self, img_size: int = 640, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, window_size: int = 14, global_blocks: Sequence[int] = GLOBAL_BLOCKS,
                 use_rel_pos: bool = True, pretrain_img_size: int = 224, act_checkpoint: bool = False):
        super().__init__()
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.act_checkpoint = act_checkpoint
        self.patch_embed = PatchEmbed(pretrain_img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC",
                                      strict_img_size=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        grid = (img_size // patch_size, img_size // patch_size)
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            WindowBlock(embed_dim, num_heads, grid, 0 if i in global_blocks else window_size, mlp_ratio, qkv_bias,
                        dpr[i], use_rel_pos) for i in range(depth))
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def abs_pos(self, hw: tuple[int, int]) -> torch.Tensor:
        """The pre-training table without its cls position, bicubically resized to the grid: [1, H, W, C]."""
        table = resize_pos_embed(self.pos_embed, hw, num_prefix=1)[:, 1:]
        return table.reshape(1, hw[0], hw[1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.abs_pos(tuple(x.shape[1:3]))
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.act_checkpoint and self.training else blk(x)
        return x.permute(0, 3, 1, 2)


# ----- simple feature pyramid ----------------------------------------------------------------------
def _scale_stage(dim: int, scale: float) -> tuple[list[nn.Module], int]:
    """The layers that bring the stride-16 map to stride 16 / scale, and their output channels."""
    if scale == 4.0:
        return [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)], dim // 4
    if scale == 2.0:
        return [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
    if scale == 1.0:
        return [], dim
    if scale == 0.5:
        return [nn.MaxPool2d(2, 2)], dim
    raise ValueError(f"scale factor {scale} is not one of 4, 2, 1, 0.5")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from the last map only: up/down-sampling per scale, then 1x1 and 3x3 convolutions
    (no bias) with channel LayerNorm, plus a stride-2 max-pooled top level: maps `p2`..`p5` and `pool`
    at strides 4, 8, 16, 32, 64 for the default scales. `.net` is the ViT (detectron2's `backbone.net`)."""

    def __init__(self, net: ViTDetBackbone, out_channels: int = 256, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        self.net, self.out_channels = net, out_channels
        patch = net.patch_embed.patch_size[0]
        self.strides: dict[str, int] = {}
        self.stages = nn.ModuleDict()
        for scale in scales:
            layers, dim = _scale_stage(net.embed_dim, scale)
            stride = int(patch / scale)
            name = f"p{int(math.log2(stride))}"
            self.stages[name] = nn.Sequential(*layers, nn.Conv2d(dim, out_channels, 1, bias=False),
                                              LayerNorm2d(out_channels),
                                              nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                              LayerNorm2d(out_channels))
            self.strides[name] = stride
        self.strides["pool"] = 2 * max(self.strides.values())

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feat = self.net(x)
        out = OrderedDict((name, stage(feat)) for name, stage in self.stages.items())
        out["pool"] = F.max_pool2d(next(reversed(out.values())), kernel_size=1, stride=2)  # LastLevelMaxPool
        return out


# ----- Mask R-CNN ---
class SquarePadTransform(GeneralizedRCNNTransform):
    """torchvision's image transform as the original uses it: training images come already jittered (no
    resize), test images are resized so that the long side is `img_size` (detections are mapped back to
    the original size); every batch is normalised, then zero-padded at the bottom/right to a square of
    `img_size` (detectron2's `square_pad`)."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__(img_size, img_size, list(mean), list(std), _skip_resize=True)
        self.img_size = img_size

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        side = max(self.img_size, *(max(img.shape[-2:]) for img in images))
        batch = images[0].new_zeros(len(images), images[0].shape[0], side, side)
        for img, slot in zip(images, batch):
            slot[:, :img.shape[1], :img.shape[2]].copy_(img)
        return batch


def build_mask_rcnn(backbone: SimpleFeaturePyramid, num_classes: int = 80, img_size: int = 640,
                    box_batch_size_per_image: int = 512, mean: Sequence[float] = (0.485, 0.456, 0.406),
                    std: Sequence[float] = (0.229, 0.224, 0.225)) -> MaskRCNN:
    """torchvision's Mask R-CNN on the pyramid with the original's heads where torchvision has them:
    2-conv RPN head, 4conv1fc box head and 4-conv mask head with channel LayerNorm, detectron2's
    proposal counts (2000/1000 per level before NMS, 1000 after) and `num_classes + 1` outputs (0 is background)."""
    dim = backbone.out_channels
    levels = list(backbone.strides)  # p2..p5, pool
    anchors = AnchorGenerator(tuple((8 * backbone.strides[n],) for n in levels), ((0.5, 1.0, 2.0),) * len(levels))
    rois = [n for n in levels if n != "pool"]
    model = MaskRCNN(
        backbone, num_classes=None,
        rpn_anchor_generator=anchors, rpn_head=RPNHead(dim, 3, conv_depth=2),
        rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000,
        box_roi_pool=MultiScaleRoIAlign(rois, 7, sampling_ratio=0),
        box_head=FastRCNNConvFCHead((dim, 7, 7), [dim] * 4, [1024], norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(1024, num_classes + 1),
        box_batch_size_per_image=box_batch_size_per_image,
        mask_roi_pool=MultiScaleRoIAlign(rois, 14, sampling_ratio=0),
        mask_head=MaskRCNNHeads(dim, [dim] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(dim, dim, num_classes + 1))
    model.transform = SquarePadTransform(img_size, mean, std)
    return model
