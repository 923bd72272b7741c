"""Vision Transformer as MAE-Lite uses it: 12-head Tiny/Small, global average pooling, original keys.

State-dict keys equal the original's (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `fc_norm.*` or `norm.*`, `head.*`), so
released checkpoints load strictly. Attention runs through `F.scaled_dot_product_attention`; when a
forward hook is registered on `blocks.i.attn.identity` (the original's hook point) that block instead
computes the scaled pre-softmax logits explicitly and passes them through the hook (as it also does on
the CPU for sequences of up to 100 tokens, where that is faster).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_

from ._registry import register

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * attn.scale + bias) v, with `attn.attn_drop`, for q/k/v of shape [B, heads, N, d].

    The explicit maths runs when a hook on `attn.identity` wants the logits (they pass through it), and
    on the CPU for short sequences, where it beats SDPA for 12 heads of 16 dims (MAE's 50 visible tokens:
    11.7 vs 18.3 ms per block, docs/performance.md); otherwise `F.scaled_dot_product_attention`.
    """
    ident = attn.identity
    if ident._forward_hooks or ident._forward_pre_hooks or (not q.is_cuda and q.shape[-2] <= 100):
        logits = q @ k.transpose(-2, -1) * attn.scale
        if bias is not None:
            logits = logits + bias
        return attn.attn_drop(ident(logits).softmax(dim=-1)) @ v
    p = attn.attn_drop.p if attn.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), dropout_p=p)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 12, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.identity = nn.Identity()  # hook point: scaled pre-softmax logits [B, heads, N, N]
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = attend(self, q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


@contextmanager
def capture_attention(model: nn.Module, layers: Sequence[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the scaled pre-softmax attention logits of `model.blocks[i]` (0-based) during forwards.

    Yields a dict {layer: logits [B, heads, N, N]} filled by each forward inside the block. Works on
    any model whose blocks expose `attn.identity`, ours or the original's.
    """
    blocks = model.blocks
    layers = range(len(blocks)) if layers is None else layers
    caught: dict[int, torch.Tensor] = {}
    handles = []
    for i in layers:
        handles.append(blocks[i].attn.identity.register_forward_hook(lambda m, inp, out, i=i: caught.__setitem__(i, out)))
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


def pool_flag(global_pool: bool | str) -> bool:
    """True for mean pooling, False for the cls token; timm's spellings 'avg' / 'token' accepted."""
    if isinstance(global_pool, str):
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be True/'avg' (mean of patch tokens) or False/'token', got {global_pool!r}")
        return global_pool == "avg"
    return bool(global_pool)


class PooledHead:
    """Mean pooling + `fc_norm` (global_pool) or cls token + `norm`, then `head`; shared by the ViT families."""

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else self.norm(x)[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class VisionTransformer(PooledHead, nn.Module):
    """Classification ViT: learned absolute position embedding, cls token, optional mean pooling."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: bool | str = True):
        super().__init__()
        self.num_classes, self.embed_dim, self.depth, self.num_heads = num_classes, embed_dim, depth, num_heads
        self.global_pool = pool_flag(global_pool)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # stochastic depth grows linearly
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i]) for i in range(depth))
        if self.global_pool:
            self.fc_norm = LayerNorm(embed_dim)
        else:
            self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # timm 0.4.12 `init_weights("")`, as the original: trunc-normal(0.02), head zero, LayerNorm 1/0,
        # patch-embedding conv left at PyTorch's default.
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name == "head":
                    nn.init.zeros_(m.weight)
                else:
                    trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return x


VIT_ARCHS = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=12),  # 12 heads, not DeiT's 3
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=12),  # 12 heads, not DeiT's 6
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
for _name, _arch in VIT_ARCHS.items():
    register(_name, VisionTransformer, _arch, globals())
