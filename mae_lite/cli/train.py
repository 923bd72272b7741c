"""`ssl_train`: the original's launcher options, one process per device, or whatever torchrun started."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

import torch

from ..engine.dist import DeviceSpec, cleanup, free_port, init_process, launched_by_torchrun, parse_devices
from ..engine.loop import train
from ..engine.perf import tune_allocator
from ..errors import Stopped, UserError
from .common import STOPPED, build_recipe, run_cli

PROG = "ssl_train"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Train a mae-lite recipe (pre-training or fine-tuning).")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="total batch over all processes (recipe default if omitted)")
    p.add_argument("-d", "--devices", default="0-7", help="GPU ids (0-7, 0,1), cpu, or cpu:N; default 0-7, CPU if no CUDA")
    p.add_argument("-e", "--max_epoch", "--max-epoch", dest="max_epoch", type=int, default=None, help="epochs")
    p.add_argument("-f", "--exp_file", "--exp-file", dest="exp_file", default="mae_lite",
                   help="recipe: a built-in name (mae_lite), the seed's file name (mae_lite_exp.py) or a .py file with Exp")
    p.add_argument("--amp", action="store_true", help="mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from <output>/last_epoch_ckpt.pth.tar, or from PATH")
    p.add_argument("--ckpt", default=None, help="initial weights, loaded at the start of a run (not on --resume)")
    p.add_argument("--ema", action="store_true", help="initial weights from the EMA copy (model_ema) of --ckpt "
                                                   "(or of the pre-training run fine-tuning finds)")
    p.add_argument("--exp-options", "--exp_options", dest="exp_options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override recipe attributes, e.g. exp_name=mae_lite/mae_tiny_400e data_root=/data")
    p.add_argument("--show-config", action="store_true", help="print the recipe's options with their values and exit")
    return p


def _worker(index: int, args: argparse.Namespace, spec: DeviceSpec) -> None:
    """Training process `index` of `spec` (spawned or in-process), or whatever rank torchrun gave this one."""
    tune_allocator()
    if launched_by_torchrun():
        rank, world, device_index = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, device_index = index, spec.nprocs, spec.ids[index]
    env = init_process(rank, world, device_index, spec.kind)
    try:
        recipe = build_recipe(args.exp_file, args.exp_options, args.batch_size, args.max_epoch)
        train(recipe, env, resume=args.resume or None, resume_requested=args.resume is not None,
              init_ckpt=args.ckpt, amp=args.amp)
    except UserError as e:
        if env.world_size > 1:  # every rank hits the same input error: rank 0 speaks, the others just stop
            stopped = isinstance(e, Stopped)
            if rank == 0:
                print(f"{PROG}: {'' if stopped else 'error: '}{e}", file=sys.stderr, flush=True)
            cleanup()
            os._exit(STOPPED if stopped else 1)
        raise
    finally:
        cleanup()


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    if args.ema:  # every process's recipe (built again in the workers) takes the EMA weights
        args.exp_options = [*(args.exp_options or []), "weights_ema=True"]
    recipe = build_recipe(args.exp_file, args.exp_options, args.batch_size, args.max_epoch)  # fail fast, before spawning
    if args.show_config:
        print(recipe.config_table())
        return 0
    if launched_by_torchrun():
        kind = "cuda" if torch.cuda.is_available() and not args.devices.lower().startswith("cpu") else "cpu"
        _worker(0, args, DeviceSpec(kind, (0,)))
        return 0
    spec = parse_devices(args.devices)
    if spec.kind == "cuda" and not torch.cuda.is_available():
        print(f"{PROG}: notice: CUDA is not available, running on the CPU in one process", file=sys.stderr)
        spec = DeviceSpec("cpu", (0,))
    if spec.kind == "cuda" and max(spec.ids) >= torch.cuda.device_count():
        raise UserError(f"-d {args.devices} asks for GPU {max(spec.ids)}, but only {torch.cuda.device_count()} are visible")
    if spec.nprocs == 1:
        _worker(0, args, spec)
        return 0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    context = torch.multiprocessing.start_processes(_worker, args=(args, spec), nprocs=spec.nprocs, join=False,
                                                     start_method="spawn")
    forward = {sig: signal.signal(sig, lambda signum, frame: _forward(signum, context)) for sig in FORWARDED}
    try:
        while not context.join():
            pass
    except torch.multiprocessing.ProcessExitedException as e:
        if e.exit_code == STOPPED:  # stopped by a signal, checkpoint saved: rank 0 has said so
            return STOPPED
        print(f"{PROG}: error: a training process exited with status {e.exit_code} (its message is above)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
    return 0


# Schedulers signal the launcher before preempting a job: pass it on to the training processes, which save a
# checkpoint after their current step and stop. (Ctrl-C reaches every process of the terminal by itself.)
FORWARDED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


def _forward(signum: int, context) -> None:
    for proc in context.processes:
        if proc.is_alive():
            os.kill(proc.pid, signum)


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
