"""`ssl_export`: a checkpoint's encoder as a timm model folder (safetensors + config.json + model card)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch
import torch.nn as nn

from .. import __version__
from ..engine.checkpoint import load_checkpoint, network_state, select_weights
from ..engine.export import export_timm
from ..errors import UserError
from .analysis_common import load_model, recipe_from
from .common import run_cli

PROG = "ssl_export"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Export a checkpoint's ViT as a timm model folder that loads "
                                                  "without mae-lite: timm.create_model('local-dir:OUT', pretrained=True).")
    p.add_argument("--ckpt", required=True, help="checkpoint: ours, the original's (module.model.*), MoCo-v3's "
                                                 "(with --exp-options weights_prefix=base_encoder) or official MAE's")
    p.add_argument("--out", required=True, help="folder to write (model.safetensors, config.json, README.md)")
    p.add_argument("-f", "--exp_file", "--exp-file", dest="exp_file", default="finetuning",
                   help="recipe whose network to export (default finetuning: ViT-Tiny, 12 heads, mean pooling)")
    p.add_argument("--exp-options", "--exp_options", dest="exp_options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="e.g. encoder_arch=vit_small_patch16 global_pool=False weights_prefix=base_encoder")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (model_ema) instead of model")
    p.add_argument("--name", default=None, help="model name in the model card (default: the checkpoint's file name)")
    return p


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    recipe = recipe_from(args)
    if args.ema:
        recipe.update({"weights_ema": True})
    if not hasattr(recipe, "build_network"):
        raise UserError(f"recipe {recipe.name} has no classification network to export; use -f finetuning "
                        "(with encoder_arch=..., global_pool=...)")
    ckpt = select_weights(load_checkpoint(args.ckpt), recipe.weights_ema, args.ckpt)
    net, summary = load_model(recipe, args.ckpt, torch.device("cpu"), checkpoint=ckpt)
    print(summary)
    saved_head = network_state(ckpt, recipe.weights_prefix).get("head.weight")
    with_head = saved_head is not None
    if with_head and isinstance(net.head, nn.Linear) and saved_head.shape != net.head.weight.shape:
        raise UserError(f"{args.ckpt} has a {saved_head.shape[0]}-class head but the recipe builds "
                        f"{net.head.weight.shape[0]} classes; add --exp-options num_classes={saved_head.shape[0]}")
    if not with_head:  # a pre-trained encoder: export it headless rather than with an untrained head
        net.reset_classifier(0)
    card = {"name": args.name or args.ckpt.rsplit("/", 1)[-1],
            "source checkpoint": args.ckpt + (" (EMA weights, model_ema)" if recipe.weights_ema else ""),
            "recipe used to build the network": recipe.name, "weights": summary.split(": ", 2)[-1],
            "classifier head": "trained (from the checkpoint)" if with_head else "none (pre-trained encoder, num_classes=0)",
            "exported by": f"mae-lite {__version__}"}
    out = export_timm(net, args.out, mean=recipe.mean, std=recipe.std, crop_pct=getattr(recipe, "crop_pct", 0.875),
                      card=card)
    for name in ("model.safetensors", "config.json", "README.md"):
        print(f"wrote {out / name}")
    print(f"load it with: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
