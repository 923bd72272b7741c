"""`ssl_sweep`: fine-tune one checkpoint on one data set over an lr x layer-decay grid and tabulate final and best
top-1 (markdown + JSON). Small transfer sets are sensitive to both; the seed leaves them to the user.

Each grid point is an ordinary run of the library's `train()` in
`<output_dir>/<pretrain_exp_name>/<prefix>sweep/lr<lr>_ld<decay>_eval/`; the tables sit next to them as
`sweep.md` and `sweep.json`, rewritten after every run. Points already in `sweep.json` with the same settings
are reused (`--force` retrains them, moving their old checkpoints to `overwritten-<time>/` in their folders); a diverged
run is recorded as such and the sweep goes on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional


from ..engine.checkpoint import load_checkpoint
from ..engine.dist import broadcast_object, cleanup, init_from_cli
from ..engine.loop import train
from ..engine.perf import tune_allocator
from ..errors import NonFiniteLoss, Stopped, UserError
from .common import build_recipe, run_cli

PROG = "ssl_sweep"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="lr x layer-decay grid of fine-tuning runs for one data set and "
                                                  "checkpoint; writes sweep.md and sweep.json (final and best top-1).")
    p.add_argument("-f", "--exp_file", "--exp-file", dest="exp_file", default="finetuning_transfer",
                   help="a fine-tuning recipe (default finetuning_transfer)")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="total batch (recipe default if omitted)")
    p.add_argument("-e", "--max_epoch", "--max-epoch", dest="max_epoch", type=int, default=None, help="epochs per run")
    p.add_argument("-d", "--devices", default="0", help="a GPU id or cpu; several GPUs: start under torchrun")
    p.add_argument("--ckpt", default=None, help="initial weights for every run (else the recipe's pretrain_exp_name run)")
    p.add_argument("--amp", action="store_true", help="mixed precision")
    p.add_argument("--lr", dest="lrs", type=float, nargs="+", required=True, metavar="LR", help="absolute peak lrs")
    p.add_argument("--layer-decay", "--layer_decay", dest="decays", type=float, nargs="+", default=[0.75],
                   metavar="D", help="layer decays (default 0.75)")
    p.add_argument("--force", action="store_true", help="retrain points already recorded in sweep.json")
    p.add_argument("--exp-options", "--exp_options", dest="exp_options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="options of every run, e.g. pretrain_exp_name=mae_lite/mae_tiny_400e dataset=Flowers")
    return p


def point_options(args: argparse.Namespace, prefix: str, lr: float, decay: float) -> list[str]:
    return [*(args.exp_options or []), f"lr={lr!r}", f"layer_decay={decay!r}",
            f"save_folder_prefix={prefix}lr{lr:g}_ld{decay:g}_"]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for a recorded point to be reused."""
    return {"recipe": args.exp_file, "batch_size": args.batch_size, "max_epoch": args.max_epoch, "ckpt": args.ckpt,
            "amp": args.amp, "exp_options": args.exp_options or []}


def markdown(title: str, runs: list[dict[str, Any]], lrs: list[float], decays: list[float], metric: str) -> str:
    """Rows lr, columns layer decay, cells `final / best (ep N)`; then the best point."""
    cell = {(r["lr"], r["layer_decay"]): r for r in runs}

    def show(r: Optional[dict[str, Any]]) -> str:
        if r is None:
            return "-"
        if r["status"] != "done":
            return r["status"]
        return f"{r[f'final_{metric}']:.2f} / {r[f'best_{metric}']:.2f} (ep {r['best_epoch']})"

    lines = [f"# {title}", "", f"Cells: final {metric} / best {metric} (epoch of the best).", "",
             "| lr \\ layer_decay | " + " | ".join(f"{d:g}" for d in decays) + " |",
             "|---|" + "---|" * len(decays)]
    lines += [f"| {lr:g} | " + " | ".join(show(cell.get((lr, d))) for d in decays) + " |" for lr in lrs]
    done = [r for r in runs if r["status"] == "done"]
    if done:
        b = max(done, key=lambda r: r[f"best_{metric}"])
        lines += ["", f"Best: lr {b['lr']:g}, layer_decay {b['layer_decay']:g}: best {metric} {b[f'best_{metric}']:.2f} "
                      f"(epoch {b['best_epoch']}), final {b[f'final_{metric}']:.2f} — `{b['folder']}`"]
    return "\n".join(lines) + "\n"


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    base = build_recipe(args.exp_file, args.exp_options, args.batch_size, args.max_epoch)
    if "layer_decay" not in base.fields() or "save_folder_prefix" not in base.fields():
        raise UserError(f"recipe {base.name} has no layer_decay/save_folder_prefix: sweep a fine-tuning recipe "
                        "(finetuning_transfer, finetuning, ...)")
    prefix = f"{getattr(base, 'folder_prefix', base.save_folder_prefix)}sweep/"
    grid = [(lr, d) for lr in args.lrs for d in args.decays]
    recipes = {p: build_recipe(args.exp_file, point_options(args, prefix, *p), args.batch_size, args.max_epoch)
               for p in grid}  # every point is validated before anything trains
    folder = Path(recipes[grid[0]].output_path).parent
    metric = base.primary_metric
    start = base.pretrained_path(args.ckpt) if hasattr(base, "pretrained_path") else args.ckpt
    start = start if start and Path(start).is_file() else "none (from scratch)"
    title = f"{base.name} on {getattr(base, 'dataset', '?')}, initial weights {start}"

    env = init_from_cli(args.devices)
    if env.device.type == "cpu":
        tune_allocator()
    table_json = folder / "sweep.json"
    settings = _settings(args)
    # rank 0 reads the table (the other ranks may not see its disk) and every rank follows it, point by point
    old, stopped = broadcast_object(_recorded(table_json, settings) if env.is_main and not args.force else ({}, set()),
                                    env)
    runs: list[dict[str, Any]] = []
    try:
        for i, (lr, decay) in enumerate(grid):
            recipe = recipes[(lr, decay)]
            if (lr, decay) in old:
                runs.append(old[(lr, decay)])
                if env.is_main:
                    print(f"{PROG}: [{i + 1}/{len(grid)}] lr {lr:g}, layer_decay {decay:g}: recorded, reused", flush=True)
            else:
                if env.is_main:
                    print(f"{PROG}: [{i + 1}/{len(grid)}] lr {lr:g}, layer_decay {decay:g} -> {recipe.output_path}",
                          flush=True)
                runs.append(_run(recipe, env, args, lr, decay, metric, resume=(lr, decay) in stopped))
            if env.is_main:
                folder.mkdir(parents=True, exist_ok=True)
                table_json.write_text(json.dumps({"title": title, "metric": metric, "settings": settings,
                                                  "runs": runs}, indent=1))
                (folder / "sweep.md").write_text(markdown(title, runs, args.lrs, args.decays, metric))
            if runs[-1]["status"] == "stopped":
                raise Stopped(f"stopped by a signal at lr {lr:g}, layer_decay {decay:g} ({runs[-1]['message']}); "
                              f"finished points are in {table_json}: run the same ssl_sweep command again to continue "
                              "(this point resumes from its checkpoint)")
    finally:
        cleanup()
    if env.is_main:
        print(markdown(title, runs, args.lrs, args.decays, metric))
        print(f"{PROG}: tables in {folder / 'sweep.md'} and {table_json}")
    return 0


def _recorded(table_json: Path, settings: dict[str, Any]) -> tuple[dict, set]:
    """Points of an earlier sweep with the same settings: finished ones (reused), stopped ones (resumed)."""
    try:
        saved = json.loads(table_json.read_text()) if table_json.is_file() else {}
        if saved.get("settings") != settings:
            return {}, set()
        runs = saved.get("runs", [])
        return ({(r["lr"], r["layer_decay"]): r for r in runs if r.get("status") == "done"},
                {(r["lr"], r["layer_decay"]) for r in runs if r.get("status") == "stopped"})
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}, set()


def _run(recipe, env, args: argparse.Namespace, lr: float, decay: float, metric: str,
         resume: bool = False) -> dict[str, Any]:
    """One grid point; its row as rank 0 records it, the same on every rank (only rank 0 writes checkpoints)."""
    row: dict[str, Any] = {"lr": lr, "layer_decay": decay, "folder": str(recipe.output_path)}
    try:
        # a point trained again (--force, other settings) starts over: its old checkpoints go to overwritten-<time>/
        result = train(recipe, env, init_ckpt=args.ckpt, amp=args.amp, resume_requested=resume, overwrite=not resume)
    except NonFiniteLoss as e:
        row = {**row, "status": "diverged", "message": str(e)}
    except Stopped as e:  # SIGTERM / Ctrl-C: the point's checkpoint is saved; the sweep stops after recording it
        row = {**row, "status": "stopped", "message": str(e).split(";")[0]}
    else:
        ckpt = load_checkpoint(result.checkpoint) if env.is_main else {}
        row = {**row, "status": "done", f"final_{metric}": result.metrics.get(metric),
               f"best_{metric}": ckpt.get(f"best_{metric}"), "best_epoch": ckpt.get(f"best_{metric}_epoch"),
               "final_top5": result.metrics.get("top5"), "epochs": result.epochs_done}
    return broadcast_object(row, env)


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
