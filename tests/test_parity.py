"""Our MAE against an independent reference assembled from timm's stock blocks, following the
original's forward step by step: same weights and mask must give the same loss and prediction."""
from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block as TimmBlock

import mae_lite  # noqa: F401

Norm = partial(nn.LayerNorm, eps=1e-6)


class ReferenceMAE(nn.Module):
    def __init__(self, img, patch, dim, depth, heads, ddim, ddepth, dheads):
        super().__init__()
        self.p = patch
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(TimmBlock(dim, heads, 4.0, qkv_bias=True, norm_layer=Norm) for _ in range(depth))
        self.norm = Norm(dim)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, ddim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(TimmBlock(ddim, dheads, 4.0, qkv_bias=True, norm_layer=Norm) for _ in range(ddepth))
        self.decoder_norm = Norm(ddim)
        self.decoder_pred = nn.Linear(ddim, patch * patch * 3)

    def forward(self, imgs, ids_shuffle, mask_ratio):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        N, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
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
        return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("cfg", [dict(img=32, patch=4, dim=192, depth=3, heads=12, ddim=96, ddepth=1, dheads=3),
                                 dict(img=48, patch=8, dim=64, depth=2, heads=4, ddim=32, ddepth=2, dheads=2)])
def test_mae_matches_reference_built_from_timm_blocks(cfg):
    torch.manual_seed(0)
    ours = timm.create_model("mae_vit_tiny_patch16", img_size=cfg["img"], patch_size=cfg["patch"], embed_dim=cfg["dim"],
                             depth=cfg["depth"], num_heads=cfg["heads"], decoder_embed_dim=cfg["ddim"],
                             decoder_depth=cfg["ddepth"], decoder_num_heads=cfg["dheads"], norm_pix_loss=True)
    for p in ours.parameters():  # non-trivial values everywhere (LayerNorms, biases, mask token)
        p.data.add_(torch.randn_like(p) * 0.05)
    ref = ReferenceMAE(**cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(3, 3, cfg["img"], cfg["img"])
    ids = torch.argsort(torch.rand(3, ours.patch_embed.num_patches), dim=1)
    loss, pred, mask, ids_out = ours(imgs, 0.75, ids)
    rloss, rpred, rmask = ref(imgs, ids, 0.75)
    assert torch.equal(ids_out, ids) and torch.equal(mask, rmask)
    torch.testing.assert_close(pred, rpred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, rloss, rtol=1e-6, atol=1e-6)
    loss.backward()
    rloss.backward()
    g = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g[name].grad, rtol=1e-4, atol=1e-6, msg=name)
