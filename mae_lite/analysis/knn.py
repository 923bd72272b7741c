"""Weighted k-nearest-neighbour classification on frozen features (k 20, temperature 0.07, cosine).

Each eval feature votes with its k most cosine-similar training features, neighbour j weighing
exp(sim_j / T) for its class; the class with the largest sum wins (the weighted kNN of Wu et al. 2018
that DINO, solo-learn and lightly report). Not in the original MAE-Lite. The memory bank, the similarities and
the top-k stay on the model's device (a GPU computes them in a fraction of the CPU's time).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import catch_layers, eval_mode, limited_batches, pooled_features, run_encoder


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                     max_images: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32, labels [N]) of a labelled loader, at most `max_images`, both on `device`."""
    feats, labels = [], []
    for images, target in limited_batches(loader, max_images):
        with eval_mode(model):
            feats.append(pooled_features(model, images.to(device, non_blocking=True)).float())
        labels.append(torch.as_tensor(target).to(device, non_blocking=True))
    if not feats:
        raise ValueError("extract_features: the loader gave no images")
    return torch.cat(feats), torch.cat(labels).long()


SIM_ELEMENTS = 2 ** 27  # similarities per query chunk (512 MB in float32): bounds memory for a large bank


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, eval_feats: torch.Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: Optional[int] = None, chunk: int = 1024,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Class scores [N_eval, C] of the weighted kNN vote (sorted by score gives the top-k predictions), computed
    and returned on `device` (default: the bank's)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    device = torch.device(device) if device is not None else train_feats.device
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.to(device).float(), dim=1)
    bank_labels = train_labels.to(device)
    chunk = max(1, min(chunk, SIM_ELEMENTS // max(1, len(bank))))
    scores = []
    for start in range(0, len(eval_feats), chunk):
        q = F.normalize(eval_feats[start:start + chunk].to(device).float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, eval_feats: torch.Tensor,
                 eval_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 device: torch.device | str | None = None) -> dict[str, float]:
    """Top-1 and top-5 (percent) of the weighted kNN classifier, computed on `device` (default: the bank's)."""
    num_classes = int(max(train_labels.max(), eval_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, eval_feats, k, temperature, num_classes, device=device)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top.eq(eval_labels.to(scores.device)[:, None])
    return {"top1": 100.0 * hit[:, 0].float().mean().item(), "top5": 100.0 * hit.any(dim=1).float().mean().item()}


def knn_eval(model: nn.Module, train_loader: Iterable, eval_loader: Iterable, device: torch.device | str = "cpu",
             k: int = 20, temperature: float = 0.07, max_images: Optional[int] = None) -> dict[str, float]:
    """kNN top-1/top-5 of a model's frozen pooled features: train split as the memory bank, eval split queried."""
    train_feats, train_labels = extract_features(model, train_loader, device, max_images)
    eval_feats, eval_labels = extract_features(model, eval_loader, device, max_images)
    result = knn_accuracy(train_feats, train_labels, eval_feats, eval_labels, k, temperature)
    return {**result, "train_images": len(train_feats), "eval_images": len(eval_feats), "k": min(k, len(train_feats)),
            "temperature": temperature}


@torch.no_grad()
def extract_layer_features(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                           max_images: Optional[int] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer, the mean over patch tokens of the depth + 1 representations that CKA compares (block i's
    `norm1` output, then the final norm), [N, D] each, with the labels [N]. On the CPU: depth + 1 banks may not
    fit on the device together; `layer_knn_eval` moves one at a time there."""
    feats: list[list[torch.Tensor]] = []
    labels = []
    for images, target in limited_batches(loader, max_images):
        with eval_mode(model), catch_layers(model) as caught:
            run_encoder(model, images.to(device))
        if not feats:
            feats = [[] for _ in caught]
        for i in sorted(caught):
            feats[i].append(caught[i].mean(dim=1).float().cpu())
        labels.append(torch.as_tensor(target).cpu())
    if not labels:
        raise ValueError("extract_layer_features: the loader gave no images")
    return [torch.cat(f) for f in feats], torch.cat(labels).long()


def layer_knn_eval(model: nn.Module, train_loader: Iterable, eval_loader: Iterable, device: torch.device | str = "cpu",
                   k: int = 20, temperature: float = 0.07, max_images: Optional[int] = None) -> list[dict[str, float]]:
    """kNN top-1/top-5 of every layer's mean-pooled representation (layer 0: the embeddings, layer depth: the
    final norm): where in the network the classes become separable."""
    train_feats, train_labels = extract_layer_features(model, train_loader, device, max_images)
    eval_feats, eval_labels = extract_layer_features(model, eval_loader, device, max_images)
    return [knn_accuracy(tf, train_labels, ef, eval_labels, k, temperature, device)
            for tf, ef in zip(train_feats, eval_feats)]
