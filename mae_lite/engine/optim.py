"""Parameter groups (weight-decay exclusion, per-group lr scale) and the optimizer factory."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = (),
                 lr_scale: Optional[Callable[[str], float]] = None) -> list[dict[str, Any]]:
    """Groups of trainable parameters: 1-D tensors, biases and names in `skip` get no weight decay.

    This is timm's (and the original's) rule: 3-D tokens such as `cls_token`/`mask_token` are decayed
    unless named in `skip`; frozen parameters (fixed sin-cos tables) are left out. `lr_scale(name)`
    gives each parameter a learning-rate multiplier (layer-wise decay), stored as the group's `lr_scale`.
    """
    skip = set(skip)
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        scale = lr_scale(name) if lr_scale else 1.0
        g = groups.setdefault((no_decay, scale), {"params": [], "param_names": [], "lr_scale": scale,
                                                  "weight_decay": 0.0 if no_decay else weight_decay})
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())


def adamw_kernel(device_type: str) -> dict[str, bool]:
    """AdamW's implementation for parameters on `device_type`: the fused CUDA kernel (one launch for the whole
    update, no per-parameter Python), else the multi-tensor `foreach` path (torch's CPU default is a loop)."""
    return {"fused": True} if device_type == "cuda" else {"foreach": True}


def params_device_type(groups: list[dict[str, Any]]) -> str:
    """The device type of the groups' parameters ("cpu" when there are none)."""
    for g in groups:
        for p in g["params"]:
            return p.device.type
    return "cpu"


def build_optimizer(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov) from a recipe's `opt`, `opt_betas`, `opt_eps`, `momentum`; lr set by the schedule.
    Build it after the model is on its device: AdamW's kernel (fused on CUDA) is chosen from the parameters'."""
    name = cfg.opt.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.scaled_lr, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps,
                                 **adamw_kernel(params_device_type(groups)))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.scaled_lr, momentum=cfg.momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {cfg.opt!r}")


def vit_layer_id(name: str, depth: int) -> int:
    """The original's layer ids for layer-wise lr decay: 0 for the embeddings (cls/mask token, position and
    patch embedding), i + 1 for `blocks.i.*`, depth + 1 for everything else (final norms, head)."""
    if name in ("cls_token", "mask_token", "pos_embed", "dist_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_scale(depth: int, decay: float, prefix: str = "") -> Callable[[str], float]:
    """lr scale decay^(depth + 1 - id) for a parameter name (with the wrapper's `prefix` removed)."""

    def scale(name: str) -> float:
        net_name = name[len(prefix):] if prefix and name.startswith(prefix) else name
        return decay ** (depth + 1 - vit_layer_id(net_name, depth))

    return scale
