"""Registration in timm: `build_model_with_cfg` on timm's classes, released-checkpoint configs, key filter.

Every classification architecture is built by timm itself (`build_model_with_cfg`), so `features_only`,
`pretrained_cfg`, `forward_intermediates`, grad checkpointing and `resolve_data_config` behave as for
timm's own models. Nothing downloads: a tag's `file` names the authors' checkpoint under
`checkpoints/` (as the seed's README says to put it); `pretrained_cfg_overlay=dict(file=PATH)` points
elsewhere, and a missing file is one `UserError` line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg

from ..errors import UserError

ORIGIN = "https://github.com/wangsr126/mae-lite"
PAPER = "A Closer Look at Self-Supervised Lightweight Vision Transformers (ICML 2023)"
# wrappers of ours and of the original around the network (`model.`), MoCo-v3's encoder (`base_encoder.`)
PREFIXES = ("model.", "base_encoder.")


def cfg(file: str | None = None, num_classes: int = 1000, link: str = ORIGIN,
        **kwargs) -> dict[str, Any]:
    """A pretrained cfg: the authors' file name under checkpoints/, ImageNet eval transform of the recipes."""
    return dict(file=f"checkpoints/{file}" if file else None, num_classes=num_classes,
                input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), first_conv="patch_embed.proj", classifier="head", license="apache-2.0",
                origin_url=link, paper_name=PAPER, paper_ids="arXiv:2205.14443", **kwargs)


def pool_name(global_pool: bool | str) -> str:
    """timm's pooling name; our recipes' booleans: True = mean of patch tokens ('avg'), False = cls ('token')."""
    if isinstance(global_pool, bool):
        return "avg" if global_pool else "token"
    return global_pool


def _checkpoint_overlay(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Read the tag's (or the overlay's) checkpoint file ourselves: one clear line when it is missing."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    resolved = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay)
    if resolved.state_dict is not None:
        return overlay
    name = f"{variant}.{resolved.tag}" if resolved.tag else variant
    if not resolved.file:
        raise UserError(f"{name} has no released checkpoint (nothing is downloaded): pass "
                        "pretrained_cfg_overlay=dict(file=PATH), or create it with pretrained=False")
    path = Path(resolved.file)
    if not path.is_file():
        raise UserError(f"{name}: checkpoint {path} not found (nothing is downloaded): get the authors' "
                        f"{path.name} from {resolved.origin_url or ORIGIN} and put it there, or pass "
                        "pretrained_cfg_overlay=dict(file=PATH)")
    from ..engine.checkpoint import load_checkpoint  # lazy: engine imports models

    return {**overlay, "state_dict": load_checkpoint(path), "file": str(path)}


def build(cls: Callable[..., nn.Module], variant: str, pretrained: bool, kwargs: dict[str, Any],
          filter_fn: Callable | None = None) -> nn.Module:
    """timm's `build_model_with_cfg` with our pooling booleans, our checkpoint reader and the ViT feature cfg."""
    kwargs = dict(kwargs)
    if "global_pool" in kwargs:
        kwargs["global_pool"] = pool_name(kwargs["global_pool"])
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = _checkpoint_overlay(variant, kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    model = build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)
    target = getattr(model, "model", model)  # features_only wraps the network
    target.pretrained_cfg.pop("state_dict", None)  # do not keep the whole checkpoint alive
    return model


def register(name: str, create: Callable[..., nn.Module], doc: str, namespace: dict[str, Any]) -> Callable:
    """Define `namespace[name](pretrained=False, **kw)` = `create(name, pretrained, kw)` and register it in timm."""

    def entrypoint(pretrained: bool = False, **kwargs):
        return create(name, pretrained, kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = namespace["__name__"]
    entrypoint.__doc__ = doc
    namespace[name] = entrypoint
    return register_model(entrypoint)


# ----- checkpoint layouts -> the model's keys -----------------------------------------------------------------
def network_keys(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's tensors from any layout: `{'model'|'state_dict': ...}`, DDP's `module.`, our / the
    original's `model.` wrapper, MoCo-v3's `base_encoder.`, or flat keys (official MAE, timm)."""
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def filter_state(state: dict[str, Any], model: nn.Module, left_at_init: Iterable[str] = ("fc_norm.", "head.")
                 ) -> dict[str, torch.Tensor]:
    """Turn a checkpoint of ours or the original's into `model`'s keys, as the original's fine-tuning loads it.

    Keys the model lacks (decoder, mask token, MoCo's projector head, MAE's `norm` under mean pooling,
    a teacher) are dropped; a learned position table is resized to the model's grid; fixed tables and rebuilt
    index buffers keep the model's values; `left_at_init` keys missing from a pre-trained encoder keep the
    model's initialisation. Anything else missing is left for timm's strict load to report.
    """
    own = model.state_dict()
    fixed = {n for n, _ in model.named_buffers()}
    out: dict[str, torch.Tensor] = {}
    state = network_keys(state)
    if "pos_embed" in state and "pos_embed" not in own:
        raise UserError("the checkpoint has an absolute position table (pos_embed) that this model lacks: "
                        "create it with use_abs_pos_emb=True")
    for key, value in state.items():
        if key not in own or key in fixed:
            continue
        if key == "pos_embed" and value.shape != own[key].shape and value.shape[-1] == own[key].shape[-1]:
            prefix = own[key].shape[1] - model.patch_embed.num_patches
            value = resample_abs_pos_embed(value, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix)
        if value.shape != own[key].shape and key.startswith(tuple(left_at_init)):
            continue  # e.g. a head for another number of classes
        out[key] = value
    for key in own:
        if key not in out and (key in fixed or key.startswith(tuple(left_at_init))):
            out[key] = own[key]
    return out
