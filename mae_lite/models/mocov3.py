"""The MoCo-v3 ViT (`projects/mocov3/vits.py` of the original) is timm's `VisionTransformer(global_pool='token')`
with MoCo's fixed 2-D sin-cos table (a persistent buffer, so the key stays `pos_embed` and no optimiser sees
it) and MoCo's initialisation; keys `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.i.*`, `norm.*`,
`head.*`, so a MoCo checkpoint's `base_encoder` loads into the classification ViT for fine-tuning.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer

from ._registry import build, cfg, filter_state, register
from .vit import COMMON, LayerNorm, original_vit

default_cfgs = generate_default_cfgs({
    "mocov3_vit_tiny_patch16.mocov3_in1k": cfg("mocov3_tiny_400e.pth.tar", num_classes=0,
                                               description="MoCo-v3 ViT-Tiny pre-trained 400 ep (base_encoder)"),
    "mocov3_vit_tiny_patch16.untrained*": cfg(),
    "mocov3_vit_small_patch16": cfg(),
    "mocov3_vit_base_patch16": cfg(),
})


def mocov3_sincos_2d(dim: int, grid: int | tuple[int, int], temperature: float = 10000.0) -> torch.Tensor:
    """MoCo-v3's table [1, 1 + h*w, dim]: cls position zeros, then `[sin(a), cos(a), sin(b), cos(b)]` per patch.

    MoCo builds `torch.meshgrid(arange(w), arange(h))` ('ij' indexing) and calls the first output "w", so
    for the row-major patch order `a` is the patch's ROW and `b` its column: the transpose of MAE's table
    (`sincos_2d`, column first). Each quarter has dim/4 frequencies temperature^(-i / (dim/4)), in float64.
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


@torch.no_grad()
def init_moco(model: VisionTransformer) -> VisionTransformer:
    """MoCo-v3: q, k and v as three separate xavier-uniform matrices, other Linear layers xavier-uniform, zero
    biases; cls token N(0, 1e-6); patch embedding xavier-uniform over (3 p p) inputs, zero bias."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("attn.qkv"):
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.cls_token, std=1e-6)
    proj = model.patch_embed.proj
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    return model


def moco_vit(stop_grad_conv1: bool = False, **kwargs) -> VisionTransformer:
    """`stop_grad_conv1=True` freezes the patch embedding (MoCo's random-patch-projection trick, off in the
    MAE-Lite baseline)."""
    model = original_vit(**kwargs)  # the original subclasses it: its init runs first (same random stream)
    del model.pos_embed
    model.register_buffer("pos_embed", mocov3_sincos_2d(model.embed_dim, model.patch_embed.grid_size))
    init_moco(model)
    model.patch_embed.proj.requires_grad_(not stop_grad_conv1)
    return model


VisionTransformerMoCo = VisionTransformer  # the class the MoCo-v3 models are (our former class name)


def checkpoint_filter_fn(state: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    return filter_state(state, model)


MOCOV3_ARCHS = {
    "mocov3_vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=12),  # 12 heads, as MAE-Lite's
    "mocov3_vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "mocov3_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    args = {**COMMON, "global_pool": "token", "norm_layer": LayerNorm, **MOCOV3_ARCHS[name], **kwargs}
    return build(moco_vit, name, pretrained, args, checkpoint_filter_fn)


for _name, _arch in MOCOV3_ARCHS.items():
    register(_name, _create, f"timm VisionTransformer({', '.join(f'{k}={v}' for k, v in _arch.items())}, "
             "global_pool='token') with MoCo-v3's fixed sin-cos positions", globals())
