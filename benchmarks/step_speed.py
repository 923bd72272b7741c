"""Time one MAE-Tiny pre-training step (forward + backward + AdamW) and compare it with the matmul bound.

    python benchmarks/step_speed.py                      # CPU, batch 64, 224 px, fp32
    python benchmarks/step_speed.py --no-malloc-tuning   # leave glibc's allocator alone
    python benchmarks/step_speed.py --device cuda --amp-dtype bf16 --compile   # batch 512 on the GPU

Prints img/s (median step), FLOPs per step (forward + backward, counted by FlopCounterMode), the matmul
peak measured in the same run and the same dtype (fp32, TF32 allowed on CUDA; bf16; fp16), the achieved
GFLOP/s and its share of that peak, and writes all numbers to a JSON file (--out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import timm
import mae_lite  # noqa: F401  (registers the models in timm)
from mae_lite.engine.compute import flop_counter
from mae_lite.engine.optim import param_groups
from mae_lite.engine.perf import tune_allocator

# The original implementation, measured the same way on a 2-core CPU VM. 61 img/s at 37 % implies a matmul
# peak of about 340 GFLOP/s (an Intel Xeon host); img/s only compares on the same host (benchmarks/README.md).
REFERENCE_ORIGINAL = {"img_per_s": 61.0, "share_of_matmul_bound": 0.37, "implied_matmul_peak_gflops": 340.0,
                      "note": "original MAE-Lite code, batch 64, 224 px, fp32, 2 CPU threads, Intel Xeon host"}


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall clock); Linux only."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    t = os.times()
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.perf_counter()


def other_cores_busy(a, b) -> float | None:
    """Average number of cores that other processes used between two snapshots (noise indicator)."""
    if a is None or b is None:
        return None
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]))


def write_result(result: dict, path: str) -> None:
    """The benchmark's numbers as JSON (benchmarks/results/ by default, not tracked by git)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  wrote {out}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_peak(device: torch.device, n: int, runs: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype`: median of `runs` timed calls after two warm-up calls."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    t = statistics.median(timed(lambda: torch.mm(a, b, out=out), device) for _ in range(runs))
    return 2 * n**3 / t / 1e9


def build(args, device: torch.device):
    torch.manual_seed(0)
    if args.impl == "reference":  # the original's formulation, same sizes (benchmarks/reference_mae.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from reference_mae import ReferenceMAE

        model = ReferenceMAE(img=args.img_size).to(device)
    else:
        model = timm.create_model("mae_vit_tiny_patch16", img_size=args.img_size, norm_pix_loss=True).to(device)
    model.train()
    # fused AdamW on CUDA (what the training loop uses there); the default (foreach) elsewhere
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1.5e-4, betas=(0.9, 0.95), **fused)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    return model, opt, imgs


def count_flops(model, imgs, mask_ratio: float) -> tuple[int, dict[str, int]]:
    """FLOPs of forward + backward of one step (not the optimizer), total and per aten op."""
    counter = flop_counter()
    with counter:
        model(imgs, mask_ratio)[0].backward()
    model.zero_grad(set_to_none=True)
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


def make_step(model, opt, imgs, args, device: torch.device):
    """One training step as the loop runs it: autocast in --amp-dtype (fp16 with a GradScaler), fp32 otherwise."""
    amp = args.amp_dtype != "fp32"
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp_dtype == "fp16")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=DTYPES[args.amp_dtype], enabled=amp):
            loss = model(imgs, args.mask_ratio)[0]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def time_steps(step, args, device: torch.device) -> list[float]:
    """Seconds per step. On CUDA, events around each step and one synchronisation at the end, so that the host
    queues the next step while the GPU runs this one (as in training); on the CPU, the wall clock."""
    for _ in range(args.warmup):
        step()
    if device.type != "cuda":
        return [timed(step, device) for _ in range(args.steps)]
    events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
    sync(device)
    events[0].record()
    for e in events[1:]:
        step()
        e.record()
    sync(device)
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]


def measure(model, opt, args, device: torch.device, batch: int, peak: float) -> dict:
    """One batch size: FLOPs, (compile), timed steps; the row of numbers."""
    imgs = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    flops, flops_by_op = count_flops(model, imgs, args.mask_ratio)  # eager, fp32: the same count in any dtype
    # one static graph per batch size: a sweep must not turn the batch dimension dynamic (slower kernels)
    net = torch.compile(model, dynamic=False) if args.compile else model
    step = make_step(net, opt, imgs, args, device)
    compile_s = timed(step, device) if args.compile else None  # first call compiles (forward and backward)
    before = cpu_snapshot()
    times = time_steps(step, args, device)
    others = other_cores_busy(before, cpu_snapshot())
    t = statistics.median(times)
    achieved = flops / t / 1e9
    del imgs, net, step
    return {"batch": batch, "img_per_s": batch / t, "step_s_median": t, "step_s_all": times, "compile_s": compile_s,
            "flops_per_step": flops, "flops_by_op": flops_by_op, "achieved_gflops": achieved,
            "share_of_matmul_bound": achieved / peak, "other_processes_cores_busy": others,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps (median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch", default=None, help="images per step, or a comma-separated sweep (256,512,1024) timed "
                                                 "in one process (default 64 on the CPU, 512 on CUDA)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--threads", type=int, default=available_cores(), help="torch intra-op threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--amp-dtype", choices=sorted(DTYPES), default="fp32",
                   help="autocast dtype: bf16, fp16 (with a GradScaler) or fp32 (no autocast; TF32 matmuls on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the first step compiles, untimed)")
    p.add_argument("--peak-size", type=int, default=None, help="n of the n^3 matmul used for the peak "
                                                                "(default 2048 on the CPU, 8192 on CUDA)")
    p.add_argument("--no-malloc-tuning", action="store_true", help="do not call mae_lite.engine.perf.tune_allocator()")
    p.add_argument("--impl", choices=["mae_lite", "reference"], default="mae_lite",
                   help="ours, or the original's formulation (conv on all patches, explicit attention)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/step_speed[_reference].json on "
                                               "the CPU, step_speed_cuda_<dtype>_<eager|compiled>.json on CUDA)")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batches = [int(b) for b in str(args.batch or (512 if cuda else 64)).split(",")]
    args.batch = batches[0]  # build()'s batch
    args.peak_size = args.peak_size or (8192 if cuda else 2048)
    mode = "compiled" if args.compile else "eager"
    default_out = (f"benchmarks/results/step_speed_cuda_{args.amp_dtype}_{mode}.json" if cuda else
                   f"benchmarks/results/step_speed{'_reference' if args.impl == 'reference' else ''}.json")
    args.out = args.out or default_out

    # glibc heap tuning is a CPU-step setting (the training commands apply it on CPU runs only)
    malloc_tuned = False if args.no_malloc_tuning or cuda else tune_allocator()  # before any large allocation
    torch.set_num_threads(args.threads)
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as training on CUDA does
    dtype = DTYPES[args.amp_dtype]

    # The VM is shared and noisy: measure the peak before and after the steps and keep the higher one.
    peaks = [matmul_peak(device, args.peak_size, dtype=dtype)]
    model, opt, _ = build(args, device)
    rows = [measure(model, opt, args, device, b, peaks[0]) for b in batches]
    peaks.append(matmul_peak(device, args.peak_size, dtype=dtype))
    peak = max(peaks)
    for row in rows:  # against the higher peak
        row["share_of_matmul_bound"] = row["achieved_gflops"] / peak
    best = max(rows, key=lambda r: r["img_per_s"])
    result = {
        "model": "mae_vit_tiny_patch16", "impl": args.impl, "img_size": args.img_size,
        "mask_ratio": args.mask_ratio, "dtype": "float32" if args.amp_dtype == "fp32" else args.amp_dtype,
        "amp_dtype": args.amp_dtype, "compiled": args.compile, "device": str(device),
        "tf32": cuda and args.amp_dtype == "fp32", "fused_adamw": cuda,
        "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
        "malloc_tuning_applied": malloc_tuned,
        **best,  # the best batch size's numbers at the top level; every batch size under "rows"
        "rows": rows,
        "matmul_peak_gflops": peak, "matmul_peak_before_after": peaks, "matmul_peak_shape": [args.peak_size] * 3,
        "matmul_peak_dtype": args.amp_dtype,
        "reference_original": REFERENCE_ORIGINAL,
        "torch": torch.__version__, "timm": timm.__version__, "mae_lite": mae_lite.__version__,
        "cpu_model": cpu_model(),
        "gpu_model": torch.cuda.get_device_name(device) if cuda else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }

    ref = REFERENCE_ORIGINAL
    print(f"MAE-Tiny step ({args.impl}), {args.img_size} px, {args.amp_dtype}, {mode}, {device}, "
          f"{result['threads']} threads, malloc tuning {'on' if malloc_tuned else 'off'}")
    print(f"  matmul peak            {peak:8.1f} GFLOP/s ({args.peak_size}^3 {args.amp_dtype}"
          f"{' (TF32)' if result['tf32'] else ''}; before {peaks[0]:.0f}, after {peaks[1]:.0f})")
    for row in rows:
        times, t = row["step_s_all"], row["step_s_median"]
        print(f"  batch {row['batch']:<5}            {row['img_per_s']:8.1f} img/s (median of {args.steps} steps, "
              f"{t * 1e3:.1f} ms; min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}), "
              f"{row['flops_per_step'] / 1e9:.1f} GFLOP per step, {row['achieved_gflops']:.1f} GFLOP/s = "
              f"{row['share_of_matmul_bound']:.1%} of the matmul bound"
              + (f", compile {row['compile_s']:.1f} s" if row["compile_s"] is not None else "")
              + (f", peak memory {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else ""))
    if not cuda:  # the original was timed on a CPU host only
        print(f"  reference (original)   {ref['img_per_s']:8.1f} img/s, {ref['share_of_matmul_bound']:.0%} of the bound "
              f"(on a host with a ~{ref['implied_matmul_peak_gflops']:.0f} GFLOP/s peak)")
    others = best["other_processes_cores_busy"]
    if others is not None and others > 0.1:
        print(f"  note: other processes kept {others:.2f} cores busy on average during the timed steps")

    write_result(result, args.out)


if __name__ == "__main__":
    main()
