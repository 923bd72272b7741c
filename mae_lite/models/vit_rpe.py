"""ViT with per-layer relative position bias, q/v biases and LayerScale: the "RPE" fine-tuning model.

`vit_tiny_patch16_rpe` as the ICML release builds it for fine-tuning (fact sheet §3.3, §4.6): a BEiT-style
ViT with a learned absolute `pos_embed` kept, a relative position bias table per block (zero at init, 3
extra entries for cls->token, token->cls and cls->cls), `qkv` without bias plus separate `q_bias` and
`v_bias` (the k bias is always zero), LayerScale `gamma_1`/`gamma_2` at 0.1, mean pooling into `fc_norm`,
and a head initialised at 0.001 of trunc-normal(0.02).

State-dict keys equal the original's, so its fine-tuned checkpoint loads strictly; an MAE checkpoint loads
what matches by name (its `attn.qkv.bias` does not, as in the original).

Hook point: `blocks.i.attn.identity` sees the scaled logits *after* the relative position bias is added,
i.e. exactly what enters the softmax (the logits the original returns with `with_attn=True`), so
`capture_attention` works unchanged. With a hook registered (or on the CPU for up to 100 tokens) the block
computes those logits explicitly; otherwise it calls `F.scaled_dot_product_attention` with the bias as an
additive mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, trunc_normal_

from ._registry import register
from .vit import LayerNorm, PooledHead, attend, pool_flag


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """[h*w + 1, h*w + 1] indices into a table of (2h-1)(2w-1) + 3 rows; token 0 is the cls token.

    Patch pair (query a, key b): (dh + h - 1) * (2w - 1) + (dw + w - 1) with d = coord(a) - coord(b), patches
    numbered row-major. Row 0 (cls -> any) uses entry T-3, column 0 (any -> cls) T-2, and [0, 0] T-1, where
    T is the table length.
    """
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dh = rows[:, None] - rows[None, :]  # query minus key
    dw = cols[:, None] - cols[None, :]
    table_len = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.empty(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = (dh + h - 1) * (2 * w - 1) + (dw + w - 1)
    index[0, :] = table_len - 3
    index[:, 0] = table_len - 2
    index[0, 0] = table_len - 1
    return index


class RPEAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.grid = tuple(grid)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.num_relative_distance = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.grid), persistent=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.identity = nn.Identity()  # hook point: scaled logits + relative position bias [B, heads, N, N]
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self) -> torch.Tensor:
        """[heads, N, N] gathered from the table."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = attend(self, q, k, v, self.relative_position_bias().unsqueeze(0))
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class RPEMlp(nn.Module):
    """fc1 -> GELU -> fc2 -> dropout (the original drops only after fc2)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class RPEBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, init_values: float | None = 0.1,
                 norm_layer=LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = RPEAttention(dim, num_heads, grid, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = RPEMlp(dim, int(dim * mlp_ratio), drop=drop)
        if init_values is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma_2 is None else self.gamma_2 * m)


class VisionTransformerRPE(PooledHead, nn.Module):
    """Classification ViT with per-block relative position bias (BEiT style), as MAE-Lite's RPE recipe uses."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 init_values: float | None = 0.1, use_abs_pos_emb: bool = True, global_pool: bool | str = True,
                 init_scale: float = 0.001):
        super().__init__()
        self.num_classes, self.embed_dim, self.depth, self.num_heads = num_classes, embed_dim, depth, num_heads
        self.num_features = embed_dim
        self.global_pool = pool_flag(global_pool)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = tuple(self.patch_embed.grid_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # linear 0 -> drop_path_rate
        self.blocks = nn.ModuleList(
            RPEBlock(embed_dim, num_heads, grid, mlp_ratio, drop_rate, attn_drop_rate, dpr[i], init_values)
            for i in range(depth))
        if self.global_pool:
            self.norm = nn.Identity()
            self.fc_norm = LayerNorm(embed_dim)
        else:
            self.norm = LayerNorm(embed_dim)
            self.fc_norm = None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(init_scale)

    @torch.no_grad()
    def _init_weights(self, init_scale: float) -> None:
        # §3.3: trunc-normal(0.02) for pos/cls and every Linear/Conv weight (head included), biases 0,
        # LayerNorm 1/0; then attn.proj and mlp.fc2 of layer l (1-based) / sqrt(2l); then head x init_scale.
        # q/v biases, tables (0) and LayerScale (init_values) keep their construction values.
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.fix_init_weight()
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(init_scale)
            self.head.bias.mul_(init_scale)

    @torch.no_grad()
    def fix_init_weight(self) -> None:
        for layer, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return x


RPE_ARCHS = {
    # ICML factory: LayerScale 0.1, absolute pos_embed kept (the RPE recipe sets use_abs_pos_emb=True)
    "vit_tiny_patch16_rpe": dict(patch_size=16, embed_dim=192, depth=12, num_heads=12, mlp_ratio=4.0,
                                 init_values=0.1, use_abs_pos_emb=True),
}
for _name, _arch in RPE_ARCHS.items():
    register(_name, VisionTransformerRPE, _arch, globals())
