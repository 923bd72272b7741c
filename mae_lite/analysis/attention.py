"""Attention entropy and attention distance per layer and head (the original's `run_vis_attn.py`).

For each layer the scaled pre-softmax logits are caught by `capture_attention` (hooks on timm's q/k); the cls row and
column are dropped and the rest re-softmaxed over the patch keys. Per query:
entropy `-sum_k p log(p + 1e-6)`, distance `sum_k p d(q, k)` with d the Euclidean distance between the
two patches' grid positions times `distance_scale` (pixels per grid step: the patch size by default; the
original multiplies by 14 whatever the patch size, so pass 14 to redraw the paper's plots). Both are
averaged over queries and images, every image weighing the same.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from ..models.vit import capture_attention
from .features import eval_mode, image_batches, run_encoder


def grid_distances(grid: tuple[int, int], scale: float = 1.0) -> torch.Tensor:
    """[h*w, h*w] Euclidean distances between patch positions (row-major numbering) times `scale`."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)
    return torch.cdist(pos, pos) * scale


def entropy_and_distance(logits: torch.Tensor, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head sums over images of the query-mean entropy and distance, from patch-to-patch logits
    [B, heads, P, P] (cls already dropped) and distances [P, P]. Returns two [heads] float64 tensors."""
    p = logits.double().softmax(dim=-1)
    entropy = -(p * (p + 1e-6).log()).sum(dim=-1)  # [B, heads, P]
    distance = (p * dist.to(p.device)).sum(dim=-1)
    return entropy.mean(dim=-1).sum(dim=0), distance.mean(dim=-1).sum(dim=0)


def patch_logits(logits: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Drop the rows and columns of the prefix (cls) tokens: [B, heads, N, N] -> [B, heads, P, P]."""
    prefix = logits.shape[-1] - num_patches
    return logits[:, :, prefix:, prefix:]


@torch.no_grad()
def attention_stats(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                    max_images: Optional[int] = None, distance_scale: Optional[float] = None):
    """Mean attention entropy and distance of `model` over the images of `loader` (at most `max_images`).

    Returns (entropy, distance), each a float64 numpy array [depth, heads]. `distance_scale` defaults to
    the patch size in pixels.
    """
    grid = tuple(model.patch_embed.grid_size)
    if distance_scale is None:
        distance_scale = float(model.patch_embed.patch_size[0])
    dist = grid_distances(grid, distance_scale).to(device)
    depth, heads = len(model.blocks), model.blocks[0].attn.num_heads
    ent_sum = torch.zeros(depth, heads, dtype=torch.float64, device=device)
    dist_sum = torch.zeros_like(ent_sum)
    seen = 0
    for images in image_batches(loader, max_images):
        with eval_mode(model), capture_attention(model) as caught:
            run_encoder(model, images.to(device))
        for i in range(depth):
            e, d = entropy_and_distance(patch_logits(caught[i], grid[0] * grid[1]), dist)
            ent_sum[i] += e
            dist_sum[i] += d
        seen += len(images)
    if seen == 0:
        raise ValueError("attention_stats: the loader gave no images")
    return (ent_sum / seen).cpu().numpy(), (dist_sum / seen).cpu().numpy()


def uniform_reference(grid: tuple[int, int], distance_scale: float) -> tuple[float, float]:
    """Entropy and distance of uniform attention over the patches: about log(P), and the mean grid distance."""
    P = grid[0] * grid[1]
    return float(-torch.log(torch.tensor(1.0 / P + 1e-6, dtype=torch.float64))), \
        float(grid_distances(grid, distance_scale).mean())
