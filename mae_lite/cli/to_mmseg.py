"""`ssl_to_mmseg`: a ViT checkpoint (ours or the original's) as an MMSegmentation `MAE` backbone initialisation.

The key mapping is the original's `tools/model_converters/beit2mmseg.py`: the network's keys (prefix
`model.` / `module.model.` removed) with `patch_embed.proj` -> `patch_embed.projection`, `blocks` -> `layers`,
`norm` -> `ln` inside blocks, `mlp.fc1` -> `ffn.layers.0.0`, `mlp.fc2` -> `ffn.layers.1`; every other key kept.
As there, the patch-embedding tensors are written under both names (`patch_embed.projection.*` and the
unchanged `patch_embed.proj.*`), and the file is a flat state dict (mmseg loads it with `pretrained=`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from ..engine.checkpoint import load_checkpoint, network_state, save_checkpoint
from ..errors import UserError
from .common import run_cli

PROG = "ssl_to_mmseg"


def mmseg_keys(key: str) -> list[str]:
    """The names beit2mmseg writes a network key under (two for the patch embedding)."""
    if key.startswith("patch_embed"):
        return [key.replace("patch_embed.proj", "patch_embed.projection"), key]
    if not key.startswith("blocks"):
        return [key]
    new = key.replace("blocks", "layers")
    if "norm" in new:
        return [new.replace("norm", "ln")]
    if "mlp.fc1" in new:
        return [new.replace("mlp.fc1", "ffn.layers.0.0")]
    return [new.replace("mlp.fc2", "ffn.layers.1")]


def to_mmseg(ckpt: dict, prefix: str = "model") -> dict[str, torch.Tensor]:
    """{mmseg key: tensor} for a checkpoint whose network sits under `prefix` (`model`; '' for flat keys)."""
    prefix = prefix.strip(".")
    if prefix.startswith("module.") or prefix == "module":  # the original's spelling of the prefix
        prefix = prefix[len("module"):].lstrip(".")
    state = network_state(ckpt, prefix)
    if not any(k.startswith("blocks.") for k in state):
        raise UserError(f"no ViT block weights under prefix '{prefix}.' (keys look like: {', '.join(list(state)[:3])}); "
                        "set -wp to the right prefix (model, base_encoder, or '' for flat keys)")
    return {new: v.detach().clone() for k, v in state.items() for new in mmseg_keys(k)}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Write an MMSegmentation backbone initialisation (the original's "
                                                  "beit2mmseg key mapping) from a mae-lite ViT checkpoint.")
    p.add_argument("input", help="checkpoint: ours (model.*) or the original's (module.model.*)")
    p.add_argument("output", help="output .pth file (a flat state dict)")
    p.add_argument("-wp", "--weights-prefix", dest="prefix", default="model",
                   help="where the ViT sits in the checkpoint: model (default), base_encoder (MoCo-v3), '' (flat)")
    return p


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    weights = to_mmseg(load_checkpoint(args.input), args.prefix)
    save_checkpoint(weights, args.output)
    print(f"wrote {args.output}: {len(weights)} tensors (mmseg MAE/BEiT names: layers.*, patch_embed.projection.*)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
