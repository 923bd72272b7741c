"""Pieces shared by the analysis commands: a model from a recipe and an optional checkpoint, the loaders,
the output folder."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import build_dataset
from ..data.transforms import eval_transform
from ..engine.checkpoint import load_checkpoint, load_pretrained
from ..engine.dist import cpu_cores
from ..errors import UserError
from ..recipes import Recipe
from ..recipes.encoders import check_encoder_compatible
from .common import build_recipe


def add_model_args(p: argparse.ArgumentParser, default_exp: str = "finetuning", suffix: str = "") -> None:
    """`-f`, `--ckpt`, `--exp-options` (with a suffix for the second model of a comparison)."""
    if not suffix:
        p.add_argument("-f", "--exp_file", "--exp-file", dest="exp_file", default=default_exp,
                       help=f"recipe whose model and eval split to use (default {default_exp}; finetuning_exp.py, "
                            "finetuning_rpe_exp.py, mae_lite, ...)")
    p.add_argument(f"--ckpt{suffix}", dest=f"ckpt{suffix}", default=None,
                   help="checkpoint: ours (model.*) or the original's (module.model.*); omitted: random initialisation")
    p.add_argument(f"--exp-options{suffix}", f"--exp_options{suffix}", dest=f"exp_options{suffix}", nargs="+",
                   default=None, metavar="KEY=VALUE", help="override recipe attributes, e.g. pretrain_exp_name=... "
                                                           "img_size=... data_root=...")


def add_run_args(p: argparse.ArgumentParser, batch: int = 16, num: Optional[int] = 1024) -> None:
    """`-b`, `-n`, `--device`, `--out` as in the seed's scripts."""
    p.add_argument("-b", "--batch-size", type=int, default=batch, help=f"images per forward (default {batch})")
    p.add_argument("-n", "--num", type=int, default=num,
                   help="images to use" + (f" (default {num})" if num else " (default: all)"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1 or cpu")
    p.add_argument("--out", default=None, help="output folder (default: <output_dir>/<pretrain_exp_name>/vis, "
                                               "else the checkpoint's folder/vis)")


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def check_run_args(args: argparse.Namespace, min_batch: int = 1) -> torch.device:
    """Refuse a bad -b / -n; the device of --device."""
    if args.batch_size < min_batch:
        raise UserError(f"-b must be >= {min_batch}, got {args.batch_size}")
    if args.num is not None and args.num < 1:
        raise UserError(f"-n must be >= 1, got {args.num}")
    return parse_device(args.device)


def network(recipe: Recipe) -> nn.Module:
    """The recipe's bare network: the classifier of a fine-tuning recipe, the MAE of a pre-training one."""
    if hasattr(recipe, "build_network"):
        return recipe.build_network()
    arch = recipe.arch_record()
    if not arch:
        raise UserError(f"recipe {recipe.name} has no network to analyse; use -f finetuning or -f mae_lite")
    return timm.create_model(arch["name"], **arch["kwargs"])


def load_model(recipe: Recipe, ckpt: Optional[str], device: torch.device, what: str = "model",
               need_decoder: bool = False, checkpoint: Optional[dict] = None) -> tuple[nn.Module, str]:
    """The recipe's network with the checkpoint's weights (matching names and shapes), or randomly
    initialised without one (the paper's "Init" row); in eval mode on `device`. Returns (network, summary).
    `checkpoint`: the file `ckpt` already read, for callers that look into it themselves.

    A checkpoint that leaves encoder tensors unfilled (or, with `need_decoder`, decoder tensors), or holds
    a different encoder (heads, width, depth, patch), is refused rather than analysed half-initialised."""
    net = network(recipe)
    if not ckpt:
        summary = f"{what}: no --ckpt, randomly initialised {type(net).__name__} (the 'Init' row)"
    else:
        state = checkpoint if checkpoint is not None else load_checkpoint(ckpt)
        check_encoder_compatible(state.get("arch"), net, ckpt)
        report = load_pretrained(net, state, prefix=recipe.weights_prefix, ema=recipe.weights_ema)
        left = [k for k in report.missing if k.startswith(("blocks.", "patch_embed."))]
        if left:
            raise UserError(f"{ckpt} does not fill {len(left)} encoder tensors of this recipe's model (e.g. {left[0]}); "
                            "pick the recipe (-f) and encoder_arch/depth/patch_size/img_size it was trained with, "
                            "or weights_prefix= for other key prefixes")
        if need_decoder and any(k.startswith("decoder") for k in report.missing):
            raise UserError(f"{ckpt} has no decoder weights (an encoder-only or fine-tuned checkpoint): reconstructions "
                            "need a full pre-training checkpoint, <output_dir>/<exp_name>/last_epoch_ckpt.pth.tar")
        summary = f"{what}: {ckpt}: {report.summary}"
    return net.to(device).eval(), summary


def image_dataset(recipe: Recipe, split: str) -> Dataset:
    """A split of the recipe's dataset with the eval transform (Resize + CenterCrop, no augmentation)."""
    if split == "eval" and hasattr(recipe, "build_eval_dataset"):
        return recipe.build_eval_dataset()
    tf = eval_transform(recipe.img_size, getattr(recipe, "crop_pct", 0.875), "bicubic", recipe.mean, recipe.std,
                        output="uint8" if recipe.uint8_batches else "float")  # normalised by the loader's eval_batch
    ds = build_dataset(recipe.dataset, recipe.data_root, split, tf, getattr(recipe, "demo_samples", 2048))
    return recipe.limited(ds, split)


class PreparedLoader:
    """A DataLoader whose batches come out of the recipe's `eval_batch` (on `device`, uint8 images normalised, an
    undecodable image an error); `.dataset` and `len()` as the DataLoader's."""

    def __init__(self, loader: DataLoader, recipe: Recipe, device: torch.device):
        self.loader, self.recipe, self.device, self.dataset = loader, recipe, device, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.recipe.eval_batch(batch, self.device)


def loader(dataset: Dataset, batch: int, recipe: Recipe, device: torch.device, num: Optional[int] = None) -> PreparedLoader:
    """The first `num` images of `dataset`, in order (as the seed's scripts), batched, ready on `device`."""
    if num is not None and num < len(dataset):
        dataset = Subset(dataset, range(num))
    return PreparedLoader(DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=recipe.collate_fn(),
                                     num_workers=min(recipe.num_workers, cpu_cores()),
                                     pin_memory=device.type == "cuda"), recipe, device)


def out_dir(args_out: Optional[str], recipe: Recipe, ckpt: Optional[str]) -> Path:
    """--out; else <output_dir>/<pretrain_exp_name>/vis (where the original logs its analyses); else the
    checkpoint's folder/vis; else <output_dir>/<run name, or scratch>/vis."""
    if args_out:
        return Path(args_out)
    if getattr(recipe, "pretrain_exp_name", None):
        return Path(recipe.output_dir) / str(recipe.pretrain_exp_name) / "vis"
    if ckpt:
        return Path(ckpt).parent / "vis"
    try:
        run = recipe.run_name
    except UserError:  # a fine-tuning recipe without pretrain_exp_name
        run = "scratch"
    return Path(recipe.output_dir) / run / "vis"


def recipe_from(args: argparse.Namespace, suffix: str = "") -> Recipe:
    return build_recipe(args.exp_file, getattr(args, f"exp_options{suffix}"))
