"""Minibatch linear CKA between the layer representations of two models (the original's `run_vis_cmp_rep.py`).

Per mini-batch, linear kernels K = X X^T, L = Y Y^T (X: each image's patch tokens flattened) with zeroed
diagonals give the unbiased HSIC estimate of Nguyen et al. (2021, Eq. 3):
  HSIC(K, L) = [tr(KL) + (1'K1)(1'L1) / ((n-1)(n-2)) - 2 1'KL1 / (n-2)] / (n(n-3)).
The estimates are summed over mini-batches and
  CKA_ij = sum HSIC(K_i, L_j) / sqrt(sum HSIC(K_i, K_i) * sum HSIC(L_j, L_j)).
Kernels are computed in float64; a batch of fewer than 4 images has no unbiased estimate and is skipped.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from .features import catch_layers, eval_mode, image_batches, run_encoder

MIN_BATCH = 4


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel of [n, ...] features (flattened per sample), diagonal zeroed, float64."""
    x = x.reshape(x.shape[0], -1).double()
    k = x @ x.T
    k.fill_diagonal_(0.0)
    return k


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of two [n, n] kernels with zero diagonals (n >= 4)."""
    n = k.shape[0]
    if n < MIN_BATCH:
        raise ValueError(f"unbiased HSIC needs at least {MIN_BATCH} samples, got {n}")
    kl = k @ l
    value = kl.trace() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 * kl.sum() / (n - 2)
    return value / (n * (n - 3))


class MinibatchCKA:
    """Accumulates HSIC sums of every (layer of model 1, layer of model 2) pair over mini-batches."""

    def __init__(self, n1: int, n2: int):
        self.xy = torch.zeros(n1, n2, dtype=torch.float64)
        self.xx = torch.zeros(n1, dtype=torch.float64)
        self.yy = torch.zeros(n2, dtype=torch.float64)
        self.batches = 0

    def update(self, feats1: Sequence[torch.Tensor], feats2: Sequence[torch.Tensor]) -> bool:
        """Add one mini-batch: a list of [n, ...] features per layer for each model; False if skipped."""
        n = feats1[0].shape[0]
        if n < MIN_BATCH:
            return False
        ks = [gram(f) for f in feats1]
        ls = [gram(f) for f in feats2]
        for i, k in enumerate(ks):
            self.xx[i] += unbiased_hsic(k, k).cpu()
            for j, l in enumerate(ls):
                self.xy[i, j] += unbiased_hsic(k, l).cpu()
        for j, l in enumerate(ls):
            self.yy[j] += unbiased_hsic(l, l).cpu()
        self.batches += 1
        return True

    def result(self) -> torch.Tensor:
        """[n1, n2] CKA matrix."""
        if not self.batches:
            raise ValueError(f"no mini-batch of at least {MIN_BATCH} images was added")
        return self.xy / (self.xx[:, None].sqrt() * self.yy[None, :].sqrt())


def cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature sets [n, ...] in one batch (unbiased HSIC)."""
    acc = MinibatchCKA(1, 1)
    acc.update([x], [y])
    return float(acc.result()[0, 0])


@torch.no_grad()
def layer_cka(model1: nn.Module, model2: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
              max_images: Optional[int] = None) -> torch.Tensor:
    """[depth1 + 1, depth2 + 1] minibatch CKA between the layer representations of two models, both fed
    the same images of `loader` (at most `max_images`)."""
    acc = MinibatchCKA(len(model1.blocks) + 1, len(model2.blocks) + 1)
    for images in image_batches(loader, max_images):
        images = images.to(device)
        with eval_mode(model1, model2):
            with catch_layers(model1) as r1:
                run_encoder(model1, images)
            with catch_layers(model2) as r2:
                run_encoder(model2, images)
        acc.update([r1[i] for i in sorted(r1)], [r2[i] for i in sorted(r2)])
    return acc.result()
