"""The original's `distilled=True` ViT (fact sheet 3.1 / 4.7): a DeiT distillation head on a mean-pooled ViT.

Unlike DeiT (and timm's `VisionTransformerDistilled`, which adds a `dist_token` and pools tokens), the
original keeps one prefix token: with global pooling the class token is free, so it serves as the
distillation token. Main head: `head(fc_norm(mean of patch tokens))`; distillation head:
`head_dist(dist_norm(token 0))`. New keys `dist_norm.*`, `head_dist.*`; no `dist_token`, `pos_embed`
unchanged. Training (with `distilled_training`, timm's switch, on by default): `(logits, logits_dist)`;
eval: their average, as DeiT evaluates.

`add_distillation_head(vit)` turns any global-pooled ViT built by `timm.create_model` (timm's classes
or ours) into this model in place, so it follows whatever class the architecture name builds.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn


class DistilledHead:
    """Mixin over a ViT class whose `forward_head(x, pre_logits=True)` is fc_norm(mean of patch tokens)."""

    distilled_training: bool = True

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x_dist = self.dist_norm(x[:, 0])  # the class token, unused by the mean pooling
        x = super().forward_head(x, pre_logits=True)
        if pre_logits:
            return x
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2


@lru_cache(maxsize=None)
def distilled_class(cls: type) -> type:
    return type(f"{cls.__name__}Distilled", (DistilledHead, cls), {"__module__": __name__})


def is_global_pool(vit: nn.Module) -> bool:
    pool = getattr(vit, "global_pool", None)
    return pool is True or pool == "avg"


def add_distillation_head(vit: nn.Module) -> nn.Module:
    """Add `dist_norm` (LayerNorm, eps 1e-6) and `head_dist` (initialised like `head`) to a mean-pooled ViT."""
    if not is_global_pool(vit):
        raise ValueError("the distillation head needs a mean-pooled ViT (global_pool=True / 'avg'): the class token "
                         "is the distillation token")
    if not hasattr(vit, "cls_token") or vit.cls_token is None:
        raise ValueError(f"{type(vit).__name__} has no class token to use as the distillation token")
    dim = vit.cls_token.shape[-1]
    vit.dist_norm = nn.LayerNorm(dim, eps=1e-6)
    head = vit.head
    if isinstance(head, nn.Linear):
        vit.head_dist = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        if torch.count_nonzero(head.weight) == 0:  # zero-initialised head: the same for head_dist
            nn.init.zeros_(vit.head_dist.weight)
        else:
            nn.init.trunc_normal_(vit.head_dist.weight, std=0.02)
        if head.bias is not None:
            nn.init.zeros_(vit.head_dist.bias)
    else:
        vit.head_dist = nn.Identity()
    vit.dist_norm.to(vit.cls_token.device)
    vit.head_dist.to(vit.cls_token.device)
    vit.__class__ = distilled_class(type(vit))
    return vit
