"""D²-MAE's student (IJCV version, fact sheet 3.2 / 4.3): an MAE whose decoder reads an intermediate layer.

`mae_vit_tiny_d13_patch16` has 12 full encoder blocks plus a 13th that keeps only `norm1` and `attn.qkv`
and yields the scaled pre-softmax attention logits `q k^T * d^-0.5` (the distillation target's match).
The decoder reconstructs from `norm(output of block decode_idx)` (8): the reconstruction loss never
reaches blocks 9-13, which are trained by distillation only. State-dict keys are the original's
(`blocks.12.norm1.*`, `blocks.12.attn.qkv.*`), so downstream ViTs load blocks 0-11 and skip block 12.

`depth` counts the full blocks (12): that is the depth a downstream ViT loads, so the encoder
compatibility check of fine-tuning, transfer, detection and analysis accepts these checkpoints.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from .mae import MAE_ARCHS, MaskedAutoencoderViT, _take


class QKVLogits(nn.Module):
    """`qkv` of an attention layer that stops at the logits; `identity` is the usual hook point."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.identity = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, _ = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.identity(q @ k.transpose(-2, -1) * self.scale)


class LogitsBlock(nn.Module):
    """The 13th block: `norm1` + `attn.qkv` only (the original deletes `attn.proj`, `norm2` and `mlp`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = partial(nn.LayerNorm, eps=1e-6)(dim)
        self.attn = QKVLogits(dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))


class MaskedAutoencoderViTD2(MaskedAutoencoderViT):
    """`forward_distill(imgs, mask_ratio, ids_shuffle) -> (loss, logits of the last block, mask, ids_shuffle)`;
    `forward` keeps MaskedAutoencoderViT's contract (reconstruction from block `decode_idx`)."""

    def __init__(self, depth: int = 12, decode_idx: int = 8, **kwargs):
        if not 1 <= decode_idx <= depth:
            raise ValueError(f"decode_idx {decode_idx} is outside 1..{depth} (the full blocks)")
        super().__init__(depth=depth, **kwargs)
        self.decode_idx = decode_idx
        last = LogitsBlock(self.embed_dim, self.num_heads)
        nn.init.xavier_uniform_(last.attn.qkv.weight)  # MAE's init, as for every other Linear
        nn.init.zeros_(last.attn.qkv.bias)
        self.blocks.append(last)

    def embed_visible(self, patches: torch.Tensor, mask_ratio: float, ids_shuffle: torch.Tensor | None = None):
        """cls + visible patch tokens with positions, exactly as MaskedAutoencoderViT.forward_encoder builds them."""
        n, L, _ = patches.shape
        if L != self.patch_embed.num_patches:
            raise ValueError(f"input gives {L} patches, but the model was built for {self.patch_embed.num_patches}")
        ids_keep, mask, ids_restore, ids_shuffle = self.mask_indices(n, L, mask_ratio, ids_shuffle, patches.device)
        w = self.patch_embed.proj.weight  # [D, C, p, p]; patches are ordered (p, q, C)
        x = F.linear(_take(patches, ids_keep), w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.patch_embed.proj.bias)
        x = x + _take(self.pos_embed[:, 1:].expand(n, -1, -1), ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        return torch.cat([cls, x], dim=1), mask, ids_restore, ids_shuffle

    def forward_encoder_d2(self, imgs: torch.Tensor, mask_ratio: float, ids_shuffle: torch.Tensor | None = None,
                           patches: torch.Tensor | None = None):
        """(latent = norm(tokens after block decode_idx), logits of the last block, mask, ids_restore, ids_shuffle)."""
        patches = self.patchify(imgs) if patches is None else patches
        x, mask, ids_restore, ids_shuffle = self.embed_visible(patches, mask_ratio, ids_shuffle)
        latent = None
        for i, blk in enumerate(self.blocks):
            if i == self.decode_idx:
                latent = self.norm(x)
            x = blk(x)  # the last block returns the logits
        return latent, x, mask, ids_restore, ids_shuffle

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, ids_shuffle: torch.Tensor | None = None,
                        patches: torch.Tensor | None = None):
        latent, _, mask, ids_restore, ids_shuffle = self.forward_encoder_d2(imgs, mask_ratio, ids_shuffle, patches)
        return latent, mask, ids_restore, ids_shuffle

    def forward_distill(self, imgs: torch.Tensor, mask_ratio: float = 0.75, ids_shuffle: torch.Tensor | None = None):
        patches = self.patchify(imgs)
        latent, logits, mask, ids_restore, ids_shuffle = self.forward_encoder_d2(imgs, mask_ratio, ids_shuffle, patches)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask, patches), logits, mask, ids_shuffle


MAE_D2_ARCHS = {
    # 12 full blocks + the logits-only 13th; decoder 96 / 1 / 3 as mae_vit_tiny_patch16
    "mae_vit_tiny_d13_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=12, decoder_embed_dim=96,
                                     decoder_depth=1, decoder_num_heads=3, decode_idx=8),
}


@register_model
def mae_vit_tiny_d13_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViTD2:
    """MaskedAutoencoderViTD2: MAE-Tiny with 12 full blocks + a logits-only 13th, decoder input after block 8."""
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm hub arguments
        kwargs.pop(k, None)
    if pretrained:
        raise ValueError("mae_vit_tiny_d13_patch16 has no downloadable weights (nothing is fetched at run time): "
                         "create it with pretrained=False, then load a checkpoint with mae_lite.load_pretrained")
    return MaskedAutoencoderViTD2(**{**MAE_D2_ARCHS["mae_vit_tiny_d13_patch16"], **kwargs})


MAE_ARCHS.update(MAE_D2_ARCHS)  # an MAE architecture for the recipes (encoder_arch) and the encoder checks
