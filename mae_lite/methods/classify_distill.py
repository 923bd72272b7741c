"""DeiT-style distillation fine-tuning (the original's `finetuning_distill_exp.py`, fact sheet 4.7).

The network (`add_distillation_head`) returns `(logits, logits_dist)` in training. With the (mixed-up)
images x and targets y, and the frozen teacher's logits t on the same x:

    L = (1 - alpha) * criterion(logits, y) + alpha * D
    hard: D = CE(logits_dist, argmax t)
    soft: D = KL(log_softmax(logits_dist / tau) || log_softmax(t / tau)), summed, * tau^2 / logits_dist.numel()

(DeiT's reduction: the sum over the batch and the classes divided by their product.) In eval mode the
network averages its two heads. The teacher is held outside the module tree, as in D-MAE: moved with the
method (`.to`), but not in `state_dict()` (checkpoints), `parameters()` (optimiser, DDP), and always in
eval mode.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

DISTILL_TYPES = ("none", "soft", "hard")


def soft_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    kl = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="sum",
                  log_target=True)
    return kl * (tau * tau) / student.numel()


def hard_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student, teacher.argmax(dim=1))


class ClassifyDistill(nn.Module):
    """`forward(images, target) -> (loss, {"base", "distill"})` in training; averaged-head logits in eval."""

    def __init__(self, model: nn.Module, teacher: nn.Module, criterion: nn.Module, mixup: Optional[object] = None,
                 distill_type: str = "hard", alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distill_type not in ("soft", "hard"):
            raise ValueError(f"distill_type must be 'soft' or 'hard' here, got {distill_type!r}")
        self.model, self.criterion, self.mixup = model, criterion, mixup
        self.distill_type, self.alpha, self.tau = distill_type, alpha, tau
        teacher.requires_grad_(False)
        teacher.eval()
        self.__dict__["teacher"] = teacher  # not a child module: see the module docstring

    def train(self, mode: bool = True) -> "ClassifyDistill":
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def distill_loss(self, logits_dist: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        s, t = logits_dist.float(), teacher_logits.float()
        return soft_distillation_loss(s, t, self.tau) if self.distill_type == "soft" else hard_distillation_loss(s, t)

    def forward(self, images: torch.Tensor, target: Optional[torch.Tensor] = None):
        if not self.training:
            return self.model(images)
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        logits, logits_dist = self.model(images)
        with torch.no_grad():
            teacher_logits = self.teacher(images)  # the teacher sees the mixed-up images
        base = self.criterion(logits, target)
        distill = self.distill_loss(logits_dist, teacher_logits)
        loss = (1 - self.alpha) * base + self.alpha * distill
        return loss, {"base": base.detach(), "distill": distill.detach()}
