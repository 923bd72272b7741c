"""The MAE of the original code, written independently from its description: timm's stock blocks, all
196 patches embedded by the convolution and then masked, explicit attention, separate mean and variance.

Used as the speed baseline in `step_speed.py --impl reference` and as the parity reference in the tests.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block as TimmBlock

Norm = partial(nn.LayerNorm, eps=1e-6)


class ReferenceMAE(nn.Module):
    """MAE in the original's formulation: all patches embedded by the conv, then masked; explicit attention."""

    def __init__(self, img=224, patch=16, dim=192, depth=12, heads=12, ddim=96, ddepth=1, dheads=3):
        super().__init__()
        self.p = patch
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(TimmBlock(dim, heads, 4.0, qkv_bias=True, norm_layer=Norm) for _ in range(depth))
        for blk in self.modules():
            if hasattr(blk, "fused_attn"):
                blk.fused_attn = False  # timm 0.4.12, which the original used, computes attention explicitly
        self.norm = Norm(dim)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, ddim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(TimmBlock(ddim, dheads, 4.0, qkv_bias=True, norm_layer=Norm) for _ in range(ddepth))
        self.decoder_norm = Norm(ddim)
        self.decoder_pred = nn.Linear(ddim, patch * patch * 3)

    def forward(self, imgs, mask_ratio=0.75, ids_shuffle=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        N, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        if ids_shuffle is None:
            ids_shuffle = torch.argsort(torch.rand(N, L), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(N, L)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1), x], dim=1)
        for b in self.blocks:
            x = b(x)
        x = self.decoder_embed(self.norm(x))
        tokens = torch.cat([x[:, 1:], self.mask_token.repeat(N, L + 1 - x.shape[1], 1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for b in self.decoder_blocks:
            x = b(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        h = imgs.shape[2] // self.p
        t = imgs.reshape(N, 3, h, self.p, h, self.p).permute(0, 2, 4, 3, 5, 1).reshape(N, h * h, -1)
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred - t) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred, mask, ids_shuffle
