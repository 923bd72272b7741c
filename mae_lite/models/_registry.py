"""Registers our architectures in timm's model registry so `timm.create_model(name, **kw)` builds them."""
from __future__ import annotations

from typing import Any, Callable

from timm.models import register_model


def register(name: str, cls: type, arch: dict[str, Any], namespace: dict[str, Any]) -> Callable:
    """Define `namespace[name](pretrained=False, **kw)` building `cls(**arch, **kw)` and register it in timm."""

    def entrypoint(pretrained: bool = False, **kwargs):
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm hub arguments
            kwargs.pop(k, None)
        if pretrained:
            raise ValueError(f"{name} has no downloadable weights (nothing is fetched at run time): create it with "
                             "pretrained=False, then load a checkpoint with mae_lite.load_pretrained(model, path)")
        return cls(**{**arch, **kwargs})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = namespace["__name__"]
    entrypoint.__doc__ = f"{cls.__name__}({', '.join(f'{k}={v}' for k, v in arch.items())})"
    namespace[name] = entrypoint
    return register_model(entrypoint)
