"""`ssl_vis_attn`: attention entropy and distance per layer and head (the seed's `run_vis_attn.py`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..analysis.attention import attention_stats, uniform_reference
from ..analysis.plots import box_per_layer, safe_name
from ..errors import UserError
from .analysis_common import add_model_args, add_run_args, check_run_args, image_dataset, load_model, loader, out_dir, \
    recipe_from
from .common import run_cli

PROG = "ssl_vis_attn"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Attention entropy and distance of every head of every layer, "
                                                  "averaged over the first -n images of the recipe's eval split.")
    add_run_args(p)
    add_model_args(p)
    p.add_argument("--save_name", "--save-name", dest="save_name", default="mae", help="name in the file names and plots")
    p.add_argument("--distance-scale", "--distance_scale", dest="distance_scale", type=float, default=None,
                   help="pixels per grid step of the attention distance (default: the patch size; the original "
                        "and the paper's plots use 14)")
    return p


def write_attention(entropy: np.ndarray, distance: np.ndarray, out: Path, name: str,
                    reference: Optional[tuple[float, float]] = None) -> list[Path]:
    """attn_<name>.npy ([2, depth, heads]: entropy, distance) and the box plots attne_<name>.png, attnd_<name>.png."""
    out.mkdir(parents=True, exist_ok=True)
    name = safe_name(name)
    npy = out / f"attn_{name}.npy"
    np.save(npy, np.stack([entropy, distance]))
    ref_e, ref_d = reference or (None, None)
    pe = box_per_layer(entropy, "Average Entropy", out / f"attne_{name}.png", title=name, reference=ref_e,
                       reference_label="uniform attention" if ref_e is not None else "")
    pd = box_per_layer(distance, "Average Distance (px)", out / f"attnd_{name}.png", title=name, reference=ref_d,
                       reference_label="uniform attention" if ref_d is not None else "")
    return [npy, pe, pd]


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    device = check_run_args(args)
    if args.distance_scale is not None and args.distance_scale <= 0:
        raise UserError(f"--distance-scale must be > 0, got {args.distance_scale}")
    recipe = recipe_from(args)
    model, summary = load_model(recipe, args.ckpt, device)
    print(summary)
    data = loader(image_dataset(recipe, "eval"), args.batch_size, recipe, device, args.num)
    entropy, distance = attention_stats(model, data, device, args.num, args.distance_scale)
    scale = args.distance_scale or float(model.patch_embed.patch_size[0])
    written = write_attention(entropy, distance, out_dir(args.out, recipe, args.ckpt), args.save_name,
                              uniform_reference(tuple(model.patch_embed.grid_size), scale))
    print(f"images: {len(data.dataset)}; mean entropy per layer: "
          + " ".join(f"{v:.2f}" for v in entropy.mean(axis=1)))
    print("mean distance per layer: " + " ".join(f"{v:.1f}" for v in distance.mean(axis=1)))
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
