"""`ssl_knn`: weighted kNN top-1/top-5 of a checkpoint's frozen features (train split as memory, eval split queried)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..analysis.knn import knn_eval, layer_knn_eval
from ..analysis.plots import line_per_layer, safe_name
from ..errors import UserError
from .analysis_common import add_model_args, add_run_args, check_run_args, image_dataset, load_model, loader, out_dir, \
    recipe_from
from .common import run_cli

PROG = "ssl_knn"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Weighted kNN classification (cosine, exp(sim/T) votes) on the frozen "
                                                  "pooled features of a model; prints kNN top-1.")
    add_run_args(p, batch=64, num=None)
    add_model_args(p)
    p.add_argument("-k", "--k", dest="k", type=int, default=20, help="neighbours (default 20)")
    p.add_argument("-t", "--temperature", type=float, default=0.07, help="vote temperature (default 0.07)")
    p.add_argument("--save_name", "--save-name", dest="save_name", default="mae", help="name in the file name")
    p.add_argument("--layers", action="store_true",
                   help="also kNN on every layer's mean-pooled representation (layer 0: embeddings ... depth: final "
                        "norm): where the classes become separable; writes knn_layers_<name>.json and .png")
    return p


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    device = check_run_args(args)
    if args.k < 1 or args.temperature <= 0:
        raise UserError(f"-k must be >= 1 and --temperature > 0, got {args.k} and {args.temperature}")
    recipe = recipe_from(args)
    model, summary = load_model(recipe, args.ckpt, device)
    print(summary)
    train = loader(image_dataset(recipe, "train"), args.batch_size, recipe, device, args.num)
    evals = loader(image_dataset(recipe, "eval"), args.batch_size, recipe, device, args.num)
    result = knn_eval(model, train, evals, device, args.k, args.temperature, args.num)
    out = out_dir(args.out, recipe, args.ckpt)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"knn_{safe_name(args.save_name)}.json"
    path.write_text(json.dumps({**result, "ckpt": args.ckpt, "recipe": recipe.name}, indent=1) + "\n")
    print(f"kNN top-1: {result['top1']:.3f}")
    print(f"kNN top-5: {result['top5']:.3f} (k {result['k']}, T {args.temperature}, {result['train_images']} train / "
          f"{result['eval_images']} eval images)")
    print(f"wrote {path}")
    if args.layers:
        per_layer = layer_knn_eval(model, train, evals, device, args.k, args.temperature, args.num)
        top1 = [r["top1"] for r in per_layer]
        print("kNN top-1 per layer (0: embeddings): " + " ".join(f"{v:.1f}" for v in top1))
        layers_json = out / f"knn_layers_{safe_name(args.save_name)}.json"
        layers_json.write_text(json.dumps({"layers": per_layer, "ckpt": args.ckpt, "recipe": recipe.name}, indent=1) + "\n")
        png = line_per_layer(top1, "kNN top-1 (%)", out / f"knn_layers_{safe_name(args.save_name)}.png", args.save_name)
        print(f"wrote {layers_json}")
        print(f"wrote {png}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
