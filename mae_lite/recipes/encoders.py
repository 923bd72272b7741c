"""Encoder shapes of registered architectures, to refuse loading weights into a different encoder."""
from __future__ import annotations

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
