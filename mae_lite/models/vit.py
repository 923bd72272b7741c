"""MAE-Lite's classification ViTs are timm's own `VisionTransformer`: 12-head Tiny/Small, mean pooling.

`vit_tiny_patch16` = `VisionTransformer(embed_dim=192, depth=12, num_heads=12, global_pool='avg')` (fc_norm on
the mean of the patch tokens, no final norm) with the original's initialisation (timm 0.4.12
`init_weights("")`); `global_pool='token'` (or False) reads the cls token after `norm`. State-dict keys are
the original's, so its checkpoints load strictly, also through timm:

    timm.create_model("vit_tiny_patch16.mae_lite_in1k", pretrained=True,
                      pretrained_cfg_overlay=dict(file="checkpoints/mae_tiny_400e.pth.tar"))

Dropout: timm's `drop_rate` is head dropout; the original's `drop_rate` is timm's `pos_drop_rate` +
`proj_drop_rate` (the recipes pass those). Attention logits for analysis and distillation come from forward
hooks (`capture_attention`), with timm's fused attention left on.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer

from ._registry import build, cfg, filter_state, register

LayerNorm = partial(nn.LayerNorm, eps=1e-6)
DRIVE = "https://drive.google.com/file/d/{}/view"

default_cfgs = generate_default_cfgs({
    # the seed README's table; the first tag with weights is each architecture's default
    "vit_tiny_patch16.scratch_in1k": cfg("deit_tiny_300e.pth.tar", link=DRIVE.format("1RvhE2HucdWYHhKmPfHQW2A4EPpCHSYN_"),
                                         description="from scratch, impr. 300 ep (DeiT-style), 75.8 top-1"),
    "vit_tiny_patch16.mae_lite_in1k": cfg("mae_tiny_400e.pth.tar", num_classes=0,
                                          link=DRIVE.format("1ZQYlvCPLZrJDqn2lp4GCIVL246WPqgEf"),
                                          description="MAE-Lite pre-trained 400 ep, encoder without head"),
    "vit_tiny_patch16.mae_lite_ft_in1k": cfg("mae_tiny_400e_ft_300e.pth.tar",
                                             link=DRIVE.format("1VEpG2c5A62PefeecjQ3yaKfRlfph3LxO"),
                                             description="MAE-Lite 400 ep + impr. 300 ep, 78.0 top-1 (77.978)"),
    "vit_tiny_patch16.mae_lite_distill_in1k": cfg("mae_tiny_distill_400e.pth.tar", num_classes=0,
                                                  link=DRIVE.format("1OCDMUEdcPhwoCPWGN0kahsHST7tbQmFe"),
                                                  description="D-MAE (distilled from MAE-Base) 400 ep, encoder"),
    "vit_tiny_patch16.mae_lite_distill_ft_in1k": cfg("mae_tiny_distill_400e_ft_300e.pth.tar",
                                                     link=DRIVE.format("1bcxwRUx6fq38M9eoBQbP2thwtU0j_9u6"),
                                                     description="D-MAE 400 ep + impr. 300 ep, 78.4 top-1"),
    "vit_tiny_patch16.mocov3_ft_in1k": cfg("mocov3_tiny_400e_ft_300e.pth.tar",
                                           description="MoCo-v3 400 ep + impr. 300 ep (layer decay 0.75), 76.8"),
    # fact sheet 5.3: ViT-Small pre-training (SMALL.md); its fine-tunes have no published file names
    "vit_small_patch16.mae_lite_in1k": cfg("mae_small_400e.pth.tar", num_classes=0,
                                           description="MAE-Lite ViT-Small pre-trained 400 ep, encoder"),
    "vit_small_patch16.untrained*": cfg(),
    # the D-MAE teacher (official MAE format, flat keys), as the analysis scripts load it
    "vit_base_patch16.mae_in1k": cfg("mae_base_1600e.pth.tar", num_classes=0,
                                     link="https://github.com/facebookresearch/mae",
                                     description="MAE-Base 1600 ep (the distillation teacher), encoder"),
    "vit_base_patch16.untrained*": cfg(),
    "vit_large_patch16": cfg(),
    "vit_huge_patch14": cfg(),
})


@torch.no_grad()
def init_original(model: nn.Module) -> nn.Module:
    """timm 0.4.12 `init_weights("")`, as the original: trunc-normal(0.02) for pos/cls and Linear weights,
    head zero, biases 0, LayerNorm 1/0, the patch-embedding conv left at PyTorch's default."""
    trunc_normal_(model.pos_embed, std=0.02)
    trunc_normal_(model.cls_token, std=0.02)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.weight) if name == "head" else trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def original_vit(**kwargs) -> VisionTransformer:
    return init_original(VisionTransformer(weight_init="skip", **kwargs))


def checkpoint_filter_fn(state: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    return filter_state(state, model)


VIT_ARCHS = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=12),  # 12 heads, not DeiT's 3
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=12),  # 12 heads, not DeiT's 6
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
COMMON = dict(mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm, global_pool="avg")


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    return build(original_vit, name, pretrained, {**COMMON, **VIT_ARCHS[name], **kwargs}, checkpoint_filter_fn)


for _name, _arch in VIT_ARCHS.items():
    register(_name, _create, f"timm VisionTransformer({', '.join(f'{k}={v}' for k, v in _arch.items())}, "
             "global_pool='avg')", globals())


def vit_tiny(**kwargs) -> VisionTransformer:
    """`timm.create_model("vit_tiny_patch16", **kwargs)`: the defaults of our former ViT class (Tiny, 12 heads,
    mean pooling, 1000 classes); kept as `mae_lite.models.VisionTransformer` for existing callers."""
    return build(original_vit, "vit_tiny_patch16", False, {**COMMON, **VIT_ARCHS["vit_tiny_patch16"], **kwargs},
                 checkpoint_filter_fn)


# ----- what the encoder computes inside -------------------------------------------------------------------------
def vit_dims(net: nn.Module) -> dict[str, Any]:
    """embed_dim, depth, num_heads and patch size of a ViT (timm's, the MAE model, the original's); None where
    the network has no such part."""
    blocks = getattr(net, "blocks", None)
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    return {"embed_dim": getattr(net, "embed_dim", None), "depth": len(blocks) if blocks is not None else None,
            "num_heads": getattr(blocks[0].attn, "num_heads", None) if blocks else None,
            "patch_size": patch[0] if isinstance(patch, tuple) else patch}


def uses_mean_pool(net: nn.Module) -> bool:
    """True when the head reads the mean of the patch tokens (timm's 'avg'; our older boolean True)."""
    pool = getattr(net, "global_pool", "token")
    return pool == "avg" if isinstance(pool, str) else bool(pool)


def beit_logits(attn: nn.Module, x: torch.Tensor, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled pre-softmax logits (+ relative position bias) of timm's BEiT attention for its input x."""
    B, N, _ = x.shape
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    q, k = F.linear(x, attn.qkv.weight, bias).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[:2]
    logits = q @ k.transpose(-2, -1) * attn.scale
    if attn.relative_position_bias_table is not None:
        logits = logits + attn._get_rel_pos_bias()
    return logits if shared_bias is None else logits + shared_bias


def _hook_logits(attn: nn.Module, store, i: int) -> list:
    """Hooks that put block i's logits into `store[i]`, gradients flowing, the attention itself untouched."""
    if hasattr(attn, "relative_position_bias_table"):  # timm's BEiT: recompute q, k from the block's input
        def pre(m, args, kwargs):
            store[i] = beit_logits(m, args[0], kwargs.get("shared_rel_pos_bias"))
        return [attn.register_forward_pre_hook(pre, with_kwargs=True)]
    if hasattr(attn, "q_norm") and hasattr(attn, "k_norm"):  # timm's Attention: q and k after their norms
        q: dict[str, torch.Tensor] = {}
        return [attn.q_norm.register_forward_hook(lambda m, a, out: q.__setitem__("q", out)),
                attn.k_norm.register_forward_hook(
                    lambda m, a, out: store.__setitem__(i, q.pop("q") @ out.transpose(-2, -1) * attn.scale))]
    if hasattr(attn, "identity"):  # the original's hook point
        return [attn.identity.register_forward_hook(lambda m, a, out: store.__setitem__(i, out))]
    raise ValueError(f"{type(attn).__name__} exposes no attention logits (no q_norm/k_norm, no identity)")


@contextmanager
def capture_attention(model: nn.Module, layers: Sequence[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the scaled pre-softmax attention logits `q k^T * scale` (+ relative position bias on BEiT) of
    `model.blocks[i]` (0-based) during forwards: {layer: [B, heads, N, N]}, differentiable."""
    blocks = model.blocks
    layers = range(len(blocks)) if layers is None else layers
    caught: dict[int, torch.Tensor] = {}
    handles = [h for i in layers for h in _hook_logits(blocks[i].attn, caught, i)]
    try:
        yield caught
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_representations(model: nn.Module, layers: Sequence[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the token representations the original compares and distils (its `RepCatcher`), cls included:
    layer i < depth is the output of `blocks[i].norm1` (block i's normalised input), layer depth that of the
    final `norm`. Yields {layer: [B, N, dim]} filled during forwards inside the block."""
    depth = len(model.blocks)
    layers = range(depth + 1) if layers is None else layers
    caught: dict[int, torch.Tensor] = {}
    handles = []
    for i in layers:
        if not 0 <= i <= depth:
            raise ValueError(f"representation layer {i} is outside 0..{depth}")
        module = model.norm if i == depth else model.blocks[i].norm1
        handles.append(module.register_forward_hook(lambda m, inp, out, i=i: caught.__setitem__(i, out)))
    try:
        yield caught
    finally:
        for h in handles:
            h.remove()
