"""`ssl_eval`: top-1/top-5 of a checkpoint on a recipe's eval split (ours, or the original's released files)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional


from ..engine.checkpoint import load_checkpoint, network_state, select_weights
from ..engine.dist import cleanup, init_from_cli, loader_workers
from ..engine.evaluate import eval_loader, evaluate
from ..engine.perf import tune_allocator
from ..errors import UserError
from .common import build_recipe, run_cli

PROG = "ssl_eval"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Evaluate a classification checkpoint: prints Top1 and Top5.")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="total batch (recipe default if omitted)")
    p.add_argument("-d", "--devices", default="0", help="a GPU id or cpu; several processes: start under torchrun")
    p.add_argument("-f", "--exp_file", "--exp-file", dest="exp_file", default="finetuning",
                   help="recipe whose model and eval split to use (finetuning_exp.py, finetuning_rpe_exp.py, ...)")
    p.add_argument("--ckpt", required=True, help="checkpoint: ours (model.*) or the original's (module.model.*)")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (model_ema) instead of model")
    p.add_argument("--exp-options", "--exp_options", dest="exp_options", nargs="+", default=None, metavar="KEY=VALUE")
    return p


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    recipe = build_recipe(args.exp_file, args.exp_options, args.batch_size)
    if args.ema:
        recipe.update({"weights_ema": True})
    if not hasattr(recipe, "build_eval_dataset") and not hasattr(recipe, "eval_checkpoint"):
        raise UserError(f"recipe {recipe.name} has no classification eval split; use a fine-tuning recipe with -f")
    env = init_from_cli(args.devices)
    if env.device.type == "cpu":  # the glibc heap tuning is for CPU steps; GPU runs would only hold host memory
        tune_allocator()
    try:
        if hasattr(recipe, "eval_checkpoint"):  # detection: COCO box/mask AP lines from the recipe's evaluate
            lines = recipe.eval_checkpoint(args.ckpt, env, args.amp)
            if env.is_main:
                print("\n".join(lines))
            return 0
        ckpt = select_weights(load_checkpoint(args.ckpt), recipe.weights_ema, args.ckpt)
        net = recipe.build_network()
        state, own = network_state(ckpt, recipe.weights_prefix), net.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            parts = [f"{len(v)} {n} (e.g. {v[0]})" for n, v in (("missing", missing), ("unexpected", unexpected),
                                                                  ("of another shape", wrong)) if v]
            raise UserError(f"{args.ckpt} does not fit {recipe.encoder_arch}: {', '.join(parts)} keys; pick the recipe "
                            "(-f) and encoder_arch/depth/num_classes the checkpoint was trained with")
        net.load_state_dict(state)
        net.to(env.device)
        per_proc = max(1, recipe.batch_size // env.world_size)
        workers = loader_workers(recipe.num_workers, env)  # the cores shared by the local processes
        loader = eval_loader(recipe.build_eval_dataset(), per_proc, env, workers,
                             collate_fn=recipe.collate_fn())
        top1, top5 = evaluate(net, loader, env, args.amp, prepare=recipe.eval_batch, amp_dtype=recipe.amp_dtype)
        if env.is_main:
            print(f"Top1: {top1:.3f}, Top5: {top5:.3f}")
    finally:
        cleanup()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
