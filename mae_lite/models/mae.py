"""Masked autoencoder with a ViT encoder and a light decoder, with the original's keys and maths.

Blocks are timm's ViT `Block` (keys `norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`).
Encoder: patch embedding + fixed 2-D sin-cos position embedding, per-sample random masking (argsort of
uniform noise, or a given `ids_shuffle`), cls token, blocks, `norm`. Decoder: `decoder_embed`, mask
tokens, un-shuffle, its own fixed sin-cos table, blocks, `decoder_norm`, `decoder_pred`. Loss: MSE on
masked patches only, against per-patch normalised pixels when `norm_pix_loss`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from ._registry import register
from .pos_embed import sincos_2d
from .vit import LayerNorm


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False):
        super().__init__()
        self.patch_size, self.in_chans, self.norm_pix_loss = patch_size, in_chans, norm_pix_loss
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                    for _ in range(depth))
        self.norm = LayerNorm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid, cls_token=True)[None])
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on flattened patches
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----- pixels <-> patches -------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, h*w, p*p*C], each patch ordered (row, column, channel)."""
        p = self.patch_size
        n, c, H, W = imgs.shape
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = imgs.reshape(n, c, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (H // p) * (W // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """[N, h*w, p*p*C] -> [N, C, h*p, w*p]; the grid defaults to the model's own."""
        p, c = self.patch_size, self.in_chans
        h, w = grid or self.patch_embed.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # ----- masking --------------------------------------------------------------------------------
    @staticmethod
    def mask_indices(n: int, L: int, mask_ratio: float, ids_shuffle: torch.Tensor | None = None,
                     device: torch.device | None = None):
        """Per-sample random permutation (argsort of uniform noise, or the given `ids_shuffle`); its first
        int(L * (1 - mask_ratio)) entries are kept. Returns (ids_keep, mask [n, L] with 1 = masked,
        ids_restore, ids_shuffle)."""
        len_keep = int(L * (1 - mask_ratio))
        if ids_shuffle is None:
            ids_shuffle = torch.argsort(torch.rand(n, L, device=device), dim=1)
        elif ids_shuffle.shape != (n, L):
            raise ValueError(f"ids_shuffle has shape {tuple(ids_shuffle.shape)}, expected {(n, L)}")
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(n, L, device=ids_shuffle.device)
        mask[:, :len_keep] = 0
        return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore, ids_shuffle

    @classmethod
    def random_masking(cls, x: torch.Tensor, mask_ratio: float, ids_shuffle: torch.Tensor | None = None):
        """Keep the tokens of `x` [N, L, D] chosen by `mask_indices`: (kept, mask, ids_restore, ids_shuffle)."""
        ids_keep, mask, ids_restore, ids_shuffle = cls.mask_indices(x.shape[0], x.shape[1], mask_ratio, ids_shuffle,
                                                                    x.device)
        return _take(x, ids_keep), mask, ids_restore, ids_shuffle

    # ----- encoder / decoder / loss -------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, ids_shuffle: torch.Tensor | None = None,
                        patches: torch.Tensor | None = None):
        """Encode the visible patches. Only they are embedded: the patch-embedding convolution is applied as
        the equal linear map to the kept patches (same weights, same result, a quarter of the work)."""
        patches = self.patchify(imgs) if patches is None else patches
        n, L, _ = patches.shape
        if L != self.patch_embed.num_patches:
            raise ValueError(f"input {tuple(imgs.shape[-2:])} gives {L} patches, but the model was built for "
                             f"{self.patch_embed.img_size} ({self.patch_embed.num_patches} patches)")
        ids_keep, mask, ids_restore, ids_shuffle = self.mask_indices(n, L, mask_ratio, ids_shuffle, patches.device)
        w = self.patch_embed.proj.weight  # [D, C, p, p]; patches are ordered (p, q, C)
        x = F.linear(_take(patches, ids_keep), w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.patch_embed.proj.bias)
        x = x + _take(self.pos_embed[:, 1:].expand(n, -1, -1), ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore, ids_shuffle

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, L + 1 - x.shape[1], -1)
        x_ = _take(torch.cat([x[:, 1:], mask_tokens], dim=1), ids_restore)  # un-shuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, imgs: torch.Tensor | None = None, patches: torch.Tensor | None = None) -> torch.Tensor:
        """Per-patch regression target: pixels, normalised by each patch's mean and unbiased variance."""
        target = self.patchify(imgs) if patches is None else patches
        if self.norm_pix_loss:
            var, mean = torch.var_mean(target, dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor | None, pred: torch.Tensor, mask: torch.Tensor,
                     patches: torch.Tensor | None = None) -> torch.Tensor:
        loss = F.mse_loss(pred, self.target(imgs, patches), reduction="none").mean(dim=-1)  # per patch
        return (loss * mask).sum() / mask.sum()  # masked patches only

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, ids_shuffle: torch.Tensor | None = None):
        patches = self.patchify(imgs)
        latent, mask, ids_restore, ids_shuffle = self.forward_encoder(imgs, mask_ratio, ids_shuffle, patches)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask, patches), pred, mask, ids_shuffle


def _take(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[n, ids[n]] for every sample: [N, L, D], [N, K] -> [N, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


MAE_ARCHS = {
    "mae_vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=12,
                                 decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=3),
    "mae_vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=12,
                                  decoder_embed_dim=192, decoder_depth=1, decoder_num_heads=6),
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}
def _create(name: str, pretrained: bool, kwargs: dict) -> MaskedAutoencoderViT:
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm hub arguments
        kwargs.pop(k, None)
    if pretrained:
        raise ValueError(f"{name} has no downloadable weights (nothing is fetched at run time): create it with "
                         "pretrained=False, then load a checkpoint with mae_lite.load_pretrained(model, path)")
    return MaskedAutoencoderViT(**{**MAE_ARCHS[name], **kwargs})


for _name, _arch in MAE_ARCHS.items():
    register(_name, _create, f"MaskedAutoencoderViT({', '.join(f'{k}={v}' for k, v in _arch.items())})", globals())
