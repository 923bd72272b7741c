"""mIoU / mAcc / aAcc / per-class IoU as mmseg's `IoUMetric` computes them, summed over processes.

Per image: pixels whose label is `ignore_index` are dropped; intersection, prediction, label (and so union)
areas are counted per class. The areas are summed over the whole split (every pixel once, over all
processes) before any division: IoU_c = I_c / U_c, Acc_c = I_c / L_c, aAcc = sum I / sum L, and the means are
`nanmean` over classes (a class absent from both labels and predictions has NaN IoU and does not count).
Values are percentages (mmseg prints them rounded to 2 decimals).
"""
from __future__ import annotations

import math

import torch

from .dist import DistEnv

IGNORE_INDEX = 255


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[3, num_classes] float64 areas (intersection, prediction, label) of one prediction/label pair."""
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    in_range = (label >= 0) & (label < num_classes)  # as histc(min=0, max=num_classes-1): others not counted
    hit = pred[(pred == label) & in_range]
    counts = [torch.bincount(v, minlength=num_classes)[:num_classes]
              for v in (hit, pred[(pred >= 0) & (pred < num_classes)], label[in_range])]
    return torch.stack(counts).double()


class SegAreas:
    """Running sums of the [3, num_classes] areas; `reduce(env)` sums them over processes."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.areas = torch.zeros(3, num_classes, dtype=torch.float64, device=device)

    def add(self, pred: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> None:
        self.areas += intersect_and_union(pred, label, self.areas.shape[1], ignore_index).to(self.areas.device)

    def reduce(self, env: DistEnv) -> "SegAreas":
        if env.distributed:
            torch.distributed.all_reduce(self.areas)
        return self


def seg_metrics(areas: torch.Tensor) -> tuple[dict[str, float], dict[str, list[float]]]:
    """({"mIoU", "mAcc", "aAcc"}, {"IoU": per class, "Acc": per class}) in percent from summed areas."""
    inter, pred, label = areas.double().cpu()
    union = pred + label - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))
    acc = torch.where(label > 0, inter / label.clamp(min=1), torch.full_like(inter, math.nan))
    total = label.sum().item()
    summary = {"mIoU": 100 * _nanmean(iou), "mAcc": 100 * _nanmean(acc),
               "aAcc": 100 * inter.sum().item() / total if total else math.nan}
    return summary, {"IoU": (100 * iou).tolist(), "Acc": (100 * acc).tolist()}


def _nanmean(x: torch.Tensor) -> float:
    valid = ~torch.isnan(x)
    return x[valid].mean().item() if valid.any() else math.nan


def per_class_table(per_class: dict[str, list[float]], names: list[str]) -> list[str]:
    """mmseg's per-class table as lines: `class | IoU | Acc` (nan for classes absent from labels and predictions)."""
    width = max(len(n) for n in names)
    lines = [f"{'Class':<{width}} |   IoU |   Acc"]
    for name, iou, acc in zip(names, per_class["IoU"], per_class["Acc"]):
        lines.append(f"{name:<{width}} | {iou:5.2f} | {acc:5.2f}")
    return lines
