"""The "RPE" fine-tuning ViT `vit_tiny_patch16_rpe` is timm's own `Beit` (fact sheet §3.3, §4.6).

`Beit(patch 16, 192 wide, depth 12, 12 heads, mlp 4, qkv_bias (q_bias/v_bias, no k bias), LayerScale 0.1,
use_rel_pos_bias (a zero-initialised table per block, 3 extra entries for cls), head x 0.001, mean pooling
into fc_norm)`, with the original's details kept: MLP dropout only after fc2 (timm's Mlp also drops after
GELU), the patch conv trunc-normal(0.02), the relative position index a persistent buffer (the released
checkpoint holds it), and `no_weight_decay` = {pos_embed, cls_token} (the original decays the tables).

The original's factory builds it without the absolute position table (`use_abs_pos_emb=False`); its RPE
recipe passes True, as ours does. Keys equal the original's.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs
from timm.models.beit import Beit

from ._registry import build, cfg, filter_state, pool_name, register
from .vit import LayerNorm

default_cfgs = generate_default_cfgs({
    "vit_tiny_patch16_rpe.mae_lite_ft_rpe_in1k": cfg(
        "mae_tiny_400e_ft_rpe_1000e.pth.tar", link="https://drive.google.com/file/d/1zKDnMKs6tBTnC4liTYG2AMtotKcbKr4J/view",
        description="MAE-Lite 400 ep + impr.+RPE 1000 ep, 79.0 top-1 (79.002)"),
})


class VisionTransformerRPE(Beit):
    """timm's `Beit` with the original RPE ViT's defaults and details (our pooling booleans accepted)."""

    def __init__(self, embed_dim: int = 192, num_heads: int = 12, global_pool: bool | str = "avg",
                 init_values: float | None = 0.1, use_abs_pos_emb: bool = True, use_rel_pos_bias: bool = True,
                 head_init_scale: float = 0.001, norm_layer=LayerNorm, **kwargs):
        super().__init__(embed_dim=embed_dim, num_heads=num_heads, global_pool=pool_name(global_pool),
                         init_values=init_values, use_abs_pos_emb=use_abs_pos_emb, use_rel_pos_bias=use_rel_pos_bias,
                         head_init_scale=head_init_scale, norm_layer=norm_layer, **kwargs)
        for blk in self.blocks:
            blk.mlp.drop1 = nn.Identity()  # the original drops only after fc2
            idx = blk.attn.relative_position_index
            if idx is not None:
                blk.attn.register_buffer("relative_position_index", idx, persistent=True)  # a key of the original's
        with torch.no_grad():  # §3.3: Conv weights trunc-normal(0.02) too, bias 0
            trunc_normal_(self.patch_embed.proj.weight, std=0.02)
            nn.init.zeros_(self.patch_embed.proj.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}  # the original decays the relative position tables


def checkpoint_filter_fn(state: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """As the plain ViT's; an MAE encoder lacks q/v biases, tables and LayerScale: they stay at init."""
    own = {k for k in model.state_dict() if k.startswith("blocks.")}
    left = ("fc_norm.", "head.") + tuple(k for k in own if k.endswith(("gamma_1", "gamma_2", "q_bias", "v_bias",
                                                                         "relative_position_bias_table")))
    return filter_state(state, model, left_at_init=left)


RPE_ARCHS = {
    # the original's factory: LayerScale 0.1, no absolute position table (the RPE recipe passes True)
    "vit_tiny_patch16_rpe": dict(patch_size=16, embed_dim=192, depth=12, num_heads=12, mlp_ratio=4.0,
                                 init_values=0.1, use_abs_pos_emb=False),
}
# the released RPE fine-tune was trained with the recipe's absolute position table
TAG_ARGS = {"mae_lite_ft_rpe_in1k": dict(use_abs_pos_emb=True)}


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformerRPE:
    tag = kwargs.get("pretrained_cfg") or "mae_lite_ft_rpe_in1k"
    if pretrained and isinstance(tag, str):
        kwargs = {**TAG_ARGS.get(tag, {}), **kwargs}
    return build(VisionTransformerRPE, name, pretrained, {**RPE_ARCHS[name], **kwargs}, checkpoint_filter_fn)


for _name, _arch in RPE_ARCHS.items():
    register(_name, _create, f"timm Beit({', '.join(f'{k}={v}' for k, v in _arch.items())}, use_rel_pos_bias=True)",
             globals())
