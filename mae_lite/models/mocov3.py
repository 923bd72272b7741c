"""The MoCo-v3 ViT (`projects/mocov3/vits.py` of the original): fixed 2-D sin-cos positions, cls-token output.

It is our `VisionTransformer` (same keys: `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.i.*`,
`norm.*`, `head.*`) with MoCo's initialisation and a frozen position table in MoCo's channel layout,
so a MoCo checkpoint's encoder loads into the classification ViT for fine-tuning.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._registry import register
from .vit import VisionTransformer


def mocov3_sincos_2d(dim: int, grid: int | tuple[int, int], temperature: float = 10000.0) -> torch.Tensor:
    """MoCo-v3's table [1, 1 + h*w, dim]: cls position zeros, then `[sin(a), cos(a), sin(b), cos(b)]` per patch.

    MoCo builds `torch.meshgrid(arange(w), arange(h))` ('ij' indexing) and calls the first output "w", so
    for the row-major patch order `a` is the patch's ROW and `b` its column: the transpose of MAE's table
    (`sincos_2d`, column first). Each quarter has dim/4 frequencies temperature^(-i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    h, w = (grid, grid) if isinstance(grid, int) else grid
    if h != w:
        raise ValueError(f"MoCo's sin-cos layout is defined for square patch grids only, got {h}x{w}")
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    a = rows.reshape(-1, 1).double() * omega
    b = cols.reshape(-1, 1).double() * omega
    emb = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0).float()[None]


class VisionTransformerMoCo(VisionTransformer):
    """ViT with MoCo-v3's fixed position table and initialisation; cls token + `norm` output by default.

    `stop_grad_conv1=True` freezes the patch embedding (MoCo's random-patch-projection trick, off in the
    MAE-Lite baseline).
    """

    def __init__(self, stop_grad_conv1: bool = False, global_pool: bool | str = False, **kwargs):
        super().__init__(global_pool=global_pool, **kwargs)
        self.stop_grad_conv1 = stop_grad_conv1
        table = mocov3_sincos_2d(self.embed_dim, self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # a (frozen) parameter, so the key is `pos_embed`
        self._init_moco()
        if stop_grad_conv1:
            for p in self.patch_embed.proj.parameters():
                p.requires_grad = False

    def _init_moco(self) -> None:
        # MoCo-v3: q, k and v as three separate xavier-uniform matrices, other Linear layers xavier-uniform,
        # zero biases; cls token N(0, 1e-6); patch embedding xavier-uniform over (3 p p) inputs, zero bias.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("attn.qkv"):
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        proj = self.patch_embed.proj
        fan_in = proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3]
        bound = math.sqrt(6.0 / (fan_in + self.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)


MOCOV3_ARCHS = {
    "mocov3_vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=12),  # 12 heads, as MAE-Lite's
    "mocov3_vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "mocov3_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
for _name, _arch in MOCOV3_ARCHS.items():
    register(_name, VisionTransformerMoCo, _arch, globals())
