"""Per-iteration learning-rate schedule: linear warm-up, then cosine decay (the original's `warmcos`)."""
from __future__ import annotations

import math

import torch


class WarmupCosine:
    """lr(t) = warmup_lr + (lr - warmup_lr) t / W for t < W, then lr q + min_lr (1 - q), q = (1 + cos(pi (t-W)/(T-W))) / 2.

    `step(t)` writes lr(t) x the group's `lr_scale` into every parameter group; the loop calls it
    before each iteration, so iteration 0 runs at lr(0). `scale_min_lr=False` keeps the floor
    unscaled (the original scales it with the group, see docs/differences.md). A warm-up longer
    than the run just ramps for the whole run (short test runs of long recipes).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int = 0,
                 warmup_lr: float = 0.0, min_lr: float = 0.0, scale_min_lr: bool = True):
        if total_steps <= 0 or warmup_steps < 0:
            raise ValueError(f"bad schedule: total_steps={total_steps}, warmup_steps={warmup_steps}")
        self.optimizer, self.lr, self.total_steps, self.warmup_steps = optimizer, lr, total_steps, warmup_steps
        self.warmup_lr, self.min_lr, self.scale_min_lr = warmup_lr, min_lr, scale_min_lr
        self.last_count = 0

    def value(self, t: int, scale: float = 1.0) -> float:
        if t < self.warmup_steps:
            return scale * (self.warmup_lr + (self.lr - self.warmup_lr) * t / self.warmup_steps)
        span = max(1, self.total_steps - self.warmup_steps)
        q = 0.5 * (1.0 + math.cos(math.pi * min(t - self.warmup_steps, span) / span))
        floor = self.min_lr * (scale if self.scale_min_lr else 1.0)
        return scale * self.lr * q + floor * (1.0 - q)

    def step(self, count: int) -> None:
        self.last_count = count
        for g in self.optimizer.param_groups:
            g["lr"] = self.value(count, g.get("lr_scale", 1.0))

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_count": self.last_count}

    def load_state_dict(self, state: dict) -> None:
        self.last_count = int(state.get("last_count", 0))


class WarmupMultiStep(WarmupCosine):
    """detectron2's schedule (detection): lr x gamma^(milestones passed), after a linear warm-up factor
    warmup_factor + (1 - warmup_factor) t / W for t < W. Same interface as `WarmupCosine`."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, milestones: list[int],
                 gamma: float = 0.1, warmup_steps: int = 0, warmup_factor: float = 0.001):
        super().__init__(optimizer, lr, total_steps, warmup_steps)
        self.milestones, self.gamma, self.warmup_factor = sorted(milestones), gamma, warmup_factor

    def value(self, t: int, scale: float = 1.0) -> float:
        lr = scale * self.lr * self.gamma ** sum(t >= m for m in self.milestones)
        if t < self.warmup_steps:
            lr *= self.warmup_factor + (1.0 - self.warmup_factor) * t / self.warmup_steps
        return lr
