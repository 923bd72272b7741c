"""`ssl_to_detectron2`: a ViT checkpoint (ours or the original's) as a detectron2 ViTDet initialisation.

The original's `convert_to_d2.py` writes the stripped keys (`blocks.0...`) and relies on detectron2's
matching heuristics; we write the names detectron2's ViTDet model has (`backbone.net.blocks.0...`),
which load as they are. Only the weights detectron2's ViT has are kept: patch embedding, position
embedding (with its cls position, detectron2's `pretrain_use_cls_token=True`) and the blocks.
"""
from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from ..engine.checkpoint import load_checkpoint, network_state, save_checkpoint
from ..errors import UserError
from .common import run_cli

PROG = "ssl_to_detectron2"
D2_PREFIX = "backbone.net."
VIT_KEY = re.compile(r"^(pos_embed|patch_embed\.proj\.(weight|bias)"
                     r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$")


def to_detectron2(ckpt: dict, prefix: str = "model") -> tuple[dict[str, torch.Tensor], list[str]]:
    """({`backbone.net.<key>`: tensor}, the checkpoint's network keys left out) for a checkpoint whose
    network sits under `prefix` (`model`, `base_encoder` for MoCo, '' for flat keys; `module.` is implied)."""
    prefix = prefix.strip(".")
    if prefix.startswith("module.") or prefix == "module":  # the original's spelling: -wp module.model.
        prefix = prefix[len("module"):].lstrip(".")
    state = network_state(ckpt, prefix)
    if any(k.endswith("attn.q_bias") for k in state):
        raise UserError("this is a relative-position-bias ViT (q/v biases, LayerScale): detectron2's ViT has no such "
                        "weights; convert a plain ViT checkpoint (pre-trained, distilled, MoCo or fine-tuned)")
    kept = {D2_PREFIX + k: v.detach().clone() for k, v in state.items() if VIT_KEY.match(k)}
    if not any(".blocks." in k for k in kept):
        raise UserError(f"no ViT block weights under prefix '{prefix}.' (keys look like: {', '.join(list(state)[:3])}); "
                        "set -wp to the right prefix (model, base_encoder, or '' for flat keys)")
    return kept, sorted(k for k in state if not VIT_KEY.match(k))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Write a detectron2-loadable ViTDet backbone initialisation "
                                                  "(.pth, or .pkl with numpy arrays) from a mae-lite checkpoint.")
    p.add_argument("input", help="checkpoint: ours (model.*), the original's (module.model.*), MoCo (base_encoder)")
    p.add_argument("output", help="output file, .pth or .pkl")
    p.add_argument("-wp", "--weights-prefix", dest="prefix", default="model",
                   help="where the ViT sits in the checkpoint: model (default), base_encoder (MoCo-v3), '' (flat)")
    return p


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    out = Path(args.output)
    if out.suffix not in (".pth", ".pkl"):
        raise UserError(f"output {out} must end in .pth (torch) or .pkl (numpy pickle)")
    weights, left_out = to_detectron2(load_checkpoint(args.input), args.prefix)
    if out.suffix == ".pth":
        save_checkpoint({"model": weights}, out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in weights.items()}, "__author__": "mae-lite",
                         "matching_heuristics": True}, f)
    print(f"wrote {out}: {len(weights)} tensors under '{D2_PREFIX}'; left out {len(left_out)}"
          + (f" ({', '.join(left_out[:5])}{', ...' if len(left_out) > 5 else ''})" if left_out else ""))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
