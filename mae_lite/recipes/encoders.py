"""Encoder shapes of registered architectures, to refuse loading weights into a different encoder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from ..errors import UserError
from ..engine.log import LOGGER

KEYS = ("embed_dim", "depth", "num_heads", "patch_size")


def encoder_signature(arch: dict[str, Any]) -> Optional[dict[str, Any]]:
    """embed_dim / depth / num_heads / patch_size of a stored architecture record, if the name is known."""
    from ..models import MAE_ARCHS, VIT_ARCHS

    table = {**MAE_ARCHS, **VIT_ARCHS}
    try:
        from ..models.vit_rpe import RPE_ARCHS

        table.update(RPE_ARCHS)
    except ImportError:
        pass
    if arch.get("name") not in table:
        return None
    merged = {**table[arch["name"]], **arch.get("kwargs", {})}
    return {k: merged.get(k) for k in KEYS}


def network_signature(net: nn.Module) -> dict[str, Any]:
    from ..models import vit_dims

    return vit_dims(net)


def check_encoder_compatible(arch: Optional[dict[str, Any]], net: nn.Module, path) -> None:
    """Refuse a checkpoint whose recorded encoder differs (heads, width, depth, patch); an original checkpoint
    has no record, so only the tensor shapes can be checked."""
    if not arch:
        LOGGER.info("%s has no architecture record (original-format checkpoint): checking tensor shapes only", path)
        return
    saved = encoder_signature(arch)
    if saved is None:
        return
    now = network_signature(net)
    diff = {k: (saved[k], now[k]) for k in KEYS if saved[k] is not None and now[k] is not None and saved[k] != now[k]}
    if diff:
        parts = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
        raise UserError(f"{path} holds a {arch['name']} encoder that differs from this recipe's ({parts}); "
                        "set encoder_arch (and depth/patch_size) to match it")


def backbone_checkpoint(ckpt_path: Optional[str], backbone: nn.Module, ema: bool = False) -> Optional[dict[str, Any]]:
    """The `--ckpt` of a task recipe (detection, segmentation) whose backbone is a pre-trained ViT: None without
    one (from scratch, with a notice), else the checkpoint (its EMA weights as `model` with `ema`), refused in one
    line when missing or when it holds another encoder."""
    from ..engine.checkpoint import load_checkpoint, select_weights

    if not ckpt_path:
        LOGGER.info("notice: no --ckpt: the backbone starts from random initialisation (from scratch)")
        return None
    if not Path(ckpt_path).is_file():
        raise UserError(f"--ckpt {ckpt_path}: no such file")
    ckpt = select_weights(load_checkpoint(ckpt_path), ema, ckpt_path)
    check_encoder_compatible(ckpt.get("arch"), backbone, ckpt_path)
    return ckpt


def require_blocks(report, ckpt_path: str) -> None:
    """A backbone load that filled no ViT block is a wrong prefix or file, not a pre-trained start."""
    if not any(k.startswith("blocks.") for k in report.loaded):
        raise UserError(f"{ckpt_path}: no block weights matched the backbone ({report.summary}); "
                        "check weights_prefix (model, base_encoder for MoCo, '' for flat keys)")
