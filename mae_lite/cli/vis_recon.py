"""`ssl_vis_recon`: an MAE checkpoint's reconstructions as a PNG grid (original | masked | reconstruction |
reconstruction + visible), for chosen or random images, a mask ratio and a seed."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch
from PIL import Image

from ..analysis.plots import safe_name
from ..analysis.reconstruct import DENORM, save_reconstruction_grid
from ..data.transforms import eval_transform
from ..errors import UserError
from ..models.mae import MaskedAutoencoderViT
from .analysis_common import add_model_args, image_dataset, load_model, out_dir, parse_device, recipe_from
from .common import run_cli

PROG = "ssl_vis_recon"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Reconstructions of a pre-training checkpoint (encoder + decoder).")
    add_model_args(p, default_exp="mae_lite")
    p.add_argument("-n", "--num", type=int, default=4, help="random images of the eval split (default 4)")
    p.add_argument("--index", type=int, nargs="+", default=None, help="these images of the eval split instead")
    p.add_argument("--image", nargs="+", default=None, help="these image files instead")
    p.add_argument("--mask-ratio", "--mask_ratio", dest="mask_ratio", type=float, default=None,
                   help="fraction of patches hidden (default: the recipe's, 0.75)")
    p.add_argument("--seed", type=int, default=0, help="draws the images and the mask (default 0)")
    p.add_argument("--denorm", choices=DENORM, default="patch",
                   help="norm-pix models: un-normalise predicted patches with each patch's own mean/std (patch, "
                        "default) or with those of the visible patches only (visible)")
    p.add_argument("--save_name", "--save-name", dest="save_name", default="mae", help="name in the file name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1 or cpu")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder/vis)")
    return p


def pick_images(args: argparse.Namespace, recipe) -> torch.Tensor:
    """[N, C, H, W] in the recipe's normalised space: files, indices, or `-n` random eval images."""
    if args.image:
        tf = eval_transform(recipe.img_size, getattr(recipe, "crop_pct", 0.875), "bicubic", recipe.mean, recipe.std)
        imgs = []
        for path in args.image:
            try:
                with Image.open(path) as im:
                    imgs.append(tf(im.convert("RGB")))
            except OSError as e:
                raise UserError(f"--image {path}: cannot read it ({str(e).splitlines()[0]})") from None
        return torch.stack(imgs)
    dataset = image_dataset(recipe, "eval")
    if args.index:
        bad = [i for i in args.index if not 0 <= i < len(dataset)]
        if bad:
            raise UserError(f"--index {bad[0]} is outside the eval split's 0..{len(dataset) - 1}")
        indices = args.index
    else:
        if args.num < 1:
            raise UserError(f"-n must be >= 1, got {args.num}")
        gen = torch.Generator().manual_seed(args.seed)
        indices = torch.randperm(len(dataset), generator=gen)[: args.num].tolist()
    return torch.stack([dataset[i][0] for i in indices])


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    device = parse_device(args.device)
    recipe = recipe_from(args)
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else getattr(recipe, "mask_ratio", 0.75)
    if not 0.0 <= mask_ratio < 1.0:
        raise UserError(f"--mask-ratio must be in [0, 1), got {mask_ratio}")
    model, summary = load_model(recipe, args.ckpt, device, need_decoder=True)
    if not isinstance(model, MaskedAutoencoderViT):
        raise UserError(f"recipe {recipe.name} builds a {type(model).__name__}, which has no decoder; "
                        "use a pre-training recipe (-f mae_lite) and its checkpoint")
    print(summary)
    images = pick_images(args, recipe).to(device)
    name = safe_name(args.save_name)
    path = out_dir(args.out, recipe, args.ckpt) / f"recon_{name}_mask{round(mask_ratio * 100)}_seed{args.seed}.png"
    save_reconstruction_grid(model, images, path, recipe.mean, recipe.std, mask_ratio, args.seed, args.denorm)
    print(f"wrote {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
