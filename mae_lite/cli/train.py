"""`ssl_train`: the original's launcher options, one process per device, or whatever torchrun started."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

import torch

from ..engine.dist import (DeviceSpec, cleanup, external_launcher, free_port, init_process,
                           local_device_index, parse_devices, rank_agreement)
from ..engine.loop import StopSignals, train
from ..engine.perf import tune_allocator
from ..errors import NonFiniteLoss, Stopped, UserError
from .common import DISK_FULL, STOPPED, build_recipe, exit_status, make_output_dir, run_cli

PROG = "ssl_train"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Train a mae-lite recipe (pre-training or fine-tuning).")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="total batch over all processes (recipe default if omitted)")
    p.add_argument("-d", "--devices", default=None,
                   help="GPU ids (0-7, 0,1), cpu, or cpu:N; default every visible GPU, the CPU if there is no CUDA; "
                        "under torchrun/srun the launcher decides (only cpu is used)")
    p.add_argument("-e", "--max_epoch", "--max-epoch", dest="max_epoch", type=int, default=None, help="epochs")
    p.add_argument("-f", "--exp_file", "--exp-file", dest="exp_file", default="mae_lite",
                   help="recipe: a built-in name (mae_lite), the seed's file name (mae_lite_exp.py) or a .py file with Exp")
    p.add_argument("--amp", action="store_true", help="mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from <output>/last_epoch_ckpt.pth.tar, or from PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output folder that holds a checkpoint: its checkpoints (and reconstructions) "
                        "are moved to <folder>/overwritten-<time>/, nothing is deleted; without it such a folder is "
                        "refused (continue with --resume, or use another exp_name)")
    p.add_argument("--ckpt", default=None, help="initial weights, loaded at the start of a run (not on --resume)")
    p.add_argument("--ema", action="store_true", help="initial weights from the EMA copy (model_ema) of --ckpt "
                                                   "(or of the pre-training run fine-tuning finds)")
    p.add_argument("--exp-options", "--exp_options", dest="exp_options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override recipe attributes, e.g. exp_name=mae_lite/mae_tiny_400e data_root=/data")
    p.add_argument("--show-config", action="store_true", help="print the recipe's options with their values and exit")
    return p


def device_spec(devices: Optional[str]) -> DeviceSpec:
    """What `-d` asks for on this machine: every visible GPU when omitted; one CPU process without CUDA."""
    if devices is None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return DeviceSpec("cuda", tuple(range(n))) if n else _cpu_fallback()
    spec = parse_devices(devices)
    if spec.kind == "cuda" and not torch.cuda.is_available():
        return _cpu_fallback()
    if spec.kind == "cuda" and max(spec.ids) >= torch.cuda.device_count():
        raise UserError(f"-d {devices} asks for GPU {max(spec.ids)}, but only {torch.cuda.device_count()} are visible; "
                        "omit -d to use every visible GPU")
    return spec


def _cpu_fallback() -> DeviceSpec:
    print(f"{PROG}: notice: CUDA is not available, running on the CPU in one process", file=sys.stderr)
    return DeviceSpec("cpu", (0,))


def launched_spec(devices: Optional[str], launcher: str) -> DeviceSpec:
    """Under torchrun/srun the launcher sets the processes and each takes the GPU of its local rank: `-d` only
    still chooses the CPU (`-d cpu`); GPU ids (and cpu:N counts) are ignored, with a notice from rank 0."""
    on_cpu = (devices or "").lower().startswith("cpu") or not torch.cuda.is_available()
    if devices is not None and devices.lower() != "cpu" and os.environ.get("RANK") == "0":
        print(f"{PROG}: notice: -d {devices} is ignored under {launcher}: it started {os.environ['WORLD_SIZE']} "
              f"processes and each uses {'the CPU' if on_cpu else 'the GPU of its local rank'} (set the processes "
              "with torchrun --nproc_per_node / srun --ntasks-per-node)", file=sys.stderr, flush=True)
    return DeviceSpec("cpu" if on_cpu else "cuda", (0,))


def _worker(index: int, args: argparse.Namespace, spec: DeviceSpec, launcher: Optional[str] = None) -> None:
    """Training process `index` of `spec` (spawned or in-process), or whatever rank torchrun/srun gave this one."""
    if launcher:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        device_index = local_device_index(local) if spec.kind == "cuda" else local
    else:
        rank, world, device_index = index, spec.nprocs, spec.ids[index]
    if spec.kind == "cpu":  # glibc heap tuning pays on CPU steps only; on GPU runs it would just hold host memory
        tune_allocator()
    env = init_process(rank, world, device_index, spec.kind)
    try:
        with rank_agreement(env, "setup"):  # an error on one node only (a missing folder) stops every rank, named
            recipe = build_recipe(args.exp_file, args.exp_options, args.batch_size, args.max_epoch)
            make_output_dir(recipe.output_path)  # on every rank: node-local disks need it on every node
        train(recipe, env, resume=args.resume or None, resume_requested=args.resume is not None,
              init_ckpt=args.ckpt, amp=args.amp, overwrite=args.overwrite)
    except UserError as e:
        if env.world_size > 1:  # the ranks agreed on it: rank 0 speaks; an error of this rank alone is printed here
            agreed = getattr(e, "agreed", False) or isinstance(e, (Stopped, NonFiniteLoss))
            if rank == 0 or not agreed:
                print(f"{PROG}: {'' if isinstance(e, Stopped) else 'error: '}{e}", file=sys.stderr, flush=True)
            cleanup()
            os._exit(exit_status(e))
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
    if args.overwrite and args.resume is not None:
        raise UserError("--overwrite starts the run over and --resume continues it: give one of them")
    launcher = external_launcher()
    if launcher:
        _worker(0, args, launched_spec(args.devices, launcher), launcher)
        return 0
    spec = device_spec(args.devices)
    make_output_dir(recipe.output_path)
    if spec.nprocs == 1:
        _worker(0, args, spec)
        return 0
    # one machine: always this host and a fresh port; a MASTER_ADDR/PORT left in the environment (an old job, a
    # login shell) would point the workers at another machine or a busy port
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    context = torch.multiprocessing.start_processes(_worker, args=(args, spec), nprocs=spec.nprocs, join=False,
                                                     start_method="spawn")
    forward = {sig: signal.signal(sig, lambda signum, frame: _forward(signum, context)) for sig in FORWARDED}
    try:
        while not context.join():
            pass
    except torch.multiprocessing.ProcessExitedException as e:
        if e.exit_code in (STOPPED, DISK_FULL, 2):  # stopped (checkpoint saved), disk full, bad input: rank 0 said so
            return e.exit_code
        print(f"{PROG}: error: a training process exited with status {e.exit_code} (its message is above)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
    return 0


# Schedulers signal the launcher before preempting a job: pass on the signals the training processes handle (they
# save a checkpoint after their current step and stop). Ctrl-C reaches every process of the terminal by itself.
FORWARDED = tuple(sig for sig in StopSignals.SIGNALS if sig != getattr(signal, "SIGINT", None))


def _forward(signum: int, context) -> None:
    for proc in context.processes:
        if proc.is_alive():
            os.kill(proc.pid, signum)


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
