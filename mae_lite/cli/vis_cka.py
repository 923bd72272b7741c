"""`ssl_vis_cka`: minibatch linear CKA between the layers of two models (the seed's `run_vis_cmp_rep.py`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..analysis.cka import MIN_BATCH, layer_cka
from ..analysis.plots import cka_heatmap, safe_name
from ..errors import UserError
from .analysis_common import add_model_args, add_run_args, check_run_args, image_dataset, load_model, loader, out_dir
from .common import build_recipe, run_cli

PROG = "ssl_vis_cka"


def make_parser() -> argparse.ArgumentParser:
    # no abbreviations: the seed's scripts passed `--exp-options` meaning `--exp-options2` (fact sheet 10.15)
    p = argparse.ArgumentParser(PROG, allow_abbrev=False,
                                description="Layer-by-layer CKA between two models on the first -n images of "
                                            "model 1's recipe eval split.")
    add_run_args(p)
    p.add_argument("-f", "--exp_file", "--exp-file", dest="exp_file", default="finetuning",
                   help="recipe of both models (default finetuning); --exp-options1/2 adjust each")
    p.add_argument("--exp-options", "--exp_options", dest="exp_options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="overrides for both models (applied before --exp-options1/2)")
    add_model_args(p, suffix="1")
    add_model_args(p, suffix="2")
    p.add_argument("--save_name1", "--save-name1", dest="save_name1", default="mae", help="name of model 1")
    p.add_argument("--save_name2", "--save-name2", dest="save_name2", default="mae", help="name of model 2")
    return p


def write_cka(matrix: np.ndarray, out: Path, name1: str, name2: str) -> list[Path]:
    """cka_<name1>+<name2>.npy and its heatmap .png."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cka_{safe_name(name1)}+{safe_name(name2)}"
    npy = out / f"{stem}.npy"
    np.save(npy, matrix)
    return [npy, cka_heatmap(matrix, name1, name2, out / f"{stem}.png")]


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    device = check_run_args(args, min_batch=MIN_BATCH)
    common = args.exp_options or []
    recipe1 = build_recipe(args.exp_file, common + (args.exp_options1 or []))
    recipe2 = build_recipe(args.exp_file, common + (args.exp_options2 or []))
    if recipe1.img_size != recipe2.img_size:
        raise UserError(f"both models see the same images: img_size differs ({recipe1.img_size} vs {recipe2.img_size}); "
                        "set it equal with --exp-options img_size=...")
    model1, summary1 = load_model(recipe1, args.ckpt1, device, "model 1")
    model2, summary2 = load_model(recipe2, args.ckpt2, device, "model 2")
    print(summary1)
    print(summary2)
    data = loader(image_dataset(recipe1, "eval"), args.batch_size, recipe1, device, args.num)
    if len(data.dataset) < MIN_BATCH:
        raise UserError(f"CKA needs at least {MIN_BATCH} images, the eval split gives {len(data.dataset)}")
    if len(data.dataset) % args.batch_size and len(data.dataset) % args.batch_size < MIN_BATCH:
        print(f"notice: the last batch has {len(data.dataset) % args.batch_size} images (< {MIN_BATCH}) and is skipped")
    matrix = layer_cka(model1, model2, data, device, args.num).numpy()
    written = write_cka(matrix, out_dir(args.out, recipe1, args.ckpt1), args.save_name1, args.save_name2)
    print(f"images: {len(data.dataset)}; CKA diagonal: " + " ".join(f"{v:.2f}" for v in np.diagonal(matrix)))
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
