"""Export an encoder as a timm model folder: `model.safetensors` + `config.json` (+ a model card).

Our classification ViTs are timm's own `VisionTransformer`; the folder names one of timm's own ViT architectures with every argument that differs from it spelled
out (`model_args`: 12 heads for Tiny/Small, mean pooling, image and patch size), so it loads without
mae-lite installed, locally or after uploading the folder to the Hugging Face Hub:

    timm.create_model("local-dir:<folder>", pretrained=True)
    timm.create_model("hf-hub:<user>/<repo>", pretrained=True)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import timm
import torch.nn as nn
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer

from ..errors import UserError
from ..models import vit_dims

# timm's own builders by width; `model_args` overrides their depth, heads, patch and image size anyway
TIMM_BASE = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
             1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}


def timm_model_args(net: nn.Module) -> tuple[str, dict[str, Any]]:
    """timm's architecture name and the arguments that rebuild `net` (a timm VisionTransformer) exactly."""
    if not isinstance(net, VisionTransformer):
        raise UserError(f"{type(net).__name__} has no timm twin to export to (e.g. relative position bias); "
                        "export a plain ViT (vit_*_patch16)")
    dims = vit_dims(net)
    if dims["embed_dim"] not in TIMM_BASE:
        raise UserError(f"no timm ViT of width {dims['embed_dim']} to export to; widths: {sorted(TIMM_BASE)}")
    args = {"img_size": net.patch_embed.img_size[0], **dims, "mlp_ratio": net.blocks[0].mlp.fc1.out_features / net.embed_dim,
            "qkv_bias": True, "global_pool": net.global_pool, "fc_norm": not isinstance(net.fc_norm, nn.Identity),
            "num_classes": net.num_classes}
    return TIMM_BASE[dims["embed_dim"]], args


def export_timm(net: nn.Module, out_dir: str | Path, *, mean, std, crop_pct: float = 0.875,
                interpolation: str = "bicubic", card: Optional[dict[str, Any]] = None) -> Path:
    """Write `net` as a timm model folder naming timm's own architecture (so it loads without mae-lite), after
    checking that timm rebuilds it with the same weights; returns the folder. `card` entries go into README.md."""
    out = Path(out_dir)
    arch, args = timm_model_args(net)
    timm.create_model(arch, pretrained=False, **args).load_state_dict(net.state_dict(), strict=True)
    size = args["img_size"]
    pretrained_cfg = {**getattr(net, "pretrained_cfg", {}), "architecture": arch, "input_size": (3, size, size),
                      "mean": tuple(mean), "std": tuple(std), "crop_pct": crop_pct, "interpolation": interpolation,
                      "num_classes": args["num_classes"]}
    for key in ("file", "state_dict", "tag"):
        pretrained_cfg.pop(key, None)
    saved, net.pretrained_cfg = getattr(net, "pretrained_cfg", None), pretrained_cfg
    try:
        save_for_hf(net, out, model_args=args, safe_serialization=True)
    finally:
        net.pretrained_cfg = saved
    (out / "README.md").write_text(model_card(arch, args, card or {}))
    return out


def model_card(arch: str, args: dict[str, Any], card: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in card.items())
    return f"""---
library_name: timm
tags: [image-classification, timm, mae-lite]
license: apache-2.0
---
# {card.get("name", "mae-lite ViT")}

A ViT exported by mae-lite, a re-implementation of "A Closer Look at Self-Supervised Lightweight
Vision Transformers" (MAE-Lite, ICML 2023). timm architecture `{arch}` with `model_args`
{json.dumps(args)} (note the head count: MAE-Lite's Tiny and Small use 12 heads, timm's defaults do not).

| | |
|---|---|
{rows}

```python
import timm
model = timm.create_model("local-dir:<this folder>", pretrained=True)   # or "hf-hub:<user>/<repo>"
```
"""
