"""The cost of attention distillation: one D-MAE step (MAE-Tiny student + frozen MAE-Base teacher) next to
one plain MAE-Tiny step, same batch, same images, measured alternately in one run.

    python benchmarks/distill_speed.py                  # CPU, batch 64, 224 px, fp32, all cores
    python benchmarks/distill_speed.py --device cuda --batch 256

The teacher is randomly initialised (its speed does not depend on its weights), so nothing is downloaded.
Prints img/s of both and the slowdown, and writes them to --out (JSON).
"""
from __future__ import annotations

import argparse
import datetime
import statistics

import timm
import torch

import mae_lite
from mae_lite.engine.optim import param_groups
from mae_lite.engine.perf import tune_allocator
from mae_lite.methods import MAE, MAEDistill
from step_speed import available_cores, cpu_model, cpu_snapshot, other_cores_busy, timed, write_result


def build(kind: str, args, device: torch.device):
    torch.manual_seed(0)
    student = timm.create_model("mae_vit_tiny_patch16", img_size=args.img_size, norm_pix_loss=True)
    if kind == "mae":
        method = MAE(student, args.mask_ratio)
    else:
        teacher = timm.create_model(args.teacher, img_size=args.img_size)
        method = MAEDistill(student, teacher, args.mask_ratio, attn_idx=(12,))
    method.to(device).train()
    opt = torch.optim.AdamW(param_groups(method, 0.05), lr=1.5e-4, betas=(0.9, 0.95))

    def step(imgs):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp and device.type == "cuda"):
            loss, _ = method(imgs)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps of each kind (median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--teacher", default="mae_vit_base_patch16")
    p.add_argument("--threads", type=int, default=available_cores())
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA only)")
    p.add_argument("--out", default="benchmarks/results/distill_speed.json")
    args = p.parse_args()

    tune_allocator()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    steps = {kind: build(kind, args, device) for kind in ("mae", "distill")}
    for _ in range(args.warmup):
        for step in steps.values():
            step(imgs)
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    before = cpu_snapshot()
    for _ in range(args.steps):  # alternate, so drifting machine load hits both alike
        for kind, step in steps.items():
            times[kind].append(timed(lambda: step(imgs), device))
    others = other_cores_busy(before, cpu_snapshot())
    med = {kind: statistics.median(t) for kind, t in times.items()}
    result = {
        "student": "mae_vit_tiny_patch16", "teacher": args.teacher, "distill_attn_idx": [12], "batch": args.batch,
        "img_size": args.img_size, "mask_ratio": args.mask_ratio, "device": str(device), "amp": args.amp,
        "threads": torch.get_num_threads(),
        "mae_img_per_s": args.batch / med["mae"], "distill_img_per_s": args.batch / med["distill"],
        "distill_step_cost_vs_mae": med["distill"] / med["mae"], "step_s": times,
        "other_processes_cores_busy": others, "torch": torch.__version__, "mae_lite": mae_lite.__version__,
        "cpu_model": cpu_model(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    print(f"batch {args.batch}, {args.img_size} px, {device}, {result['threads']} threads, teacher {args.teacher}")
    print(f"  MAE-Tiny step          {result['mae_img_per_s']:8.1f} img/s ({med['mae'] * 1e3:.0f} ms)")
    print(f"  D-MAE step             {result['distill_img_per_s']:8.1f} img/s ({med['distill'] * 1e3:.0f} ms)")
    print(f"  D-MAE / MAE step time  {result['distill_step_cost_vs_mae']:8.2f}x")
    if others is not None and others > 0.1:
        print(f"  note: other processes kept {others:.2f} cores busy on average during the timed steps")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
