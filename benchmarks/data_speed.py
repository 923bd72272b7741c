"""How many training images per second the data pipeline delivers, per loader-worker count: decode +
RandomResizedCrop + flip + normalise (the MAE-Lite pre-training transform), batched, as the training loop's
DataLoader does it. Compare with the model's img/s (benchmarks/step_speed.py, or the training log) to size
`num_workers`: the loader must deliver more than the GPUs consume.

    python benchmarks/data_speed.py                                   # the embedded photos (decoded once, cached)
    python benchmarks/data_speed.py --dataset folder:/data/imagenet/imagenet_train --workers 0 2 4 8

Prints img/s and img/s per worker for each count and writes them to --out (JSON).
"""
from __future__ import annotations

import argparse
import datetime
import time

import torch
from torch.utils.data import DataLoader

import mae_lite
from mae_lite.data import build_dataset, pretrain_transform
from mae_lite.recipes.base import IMAGENET_MEAN, IMAGENET_STD
from step_speed import available_cores, cpu_model, write_result


def measure(dataset, workers: int, batch: int, batches: int) -> float:
    """img/s over `batches` batches after the first (worker start-up is not counted)."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=False)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        images, _ = next(it)
        n += len(images)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="demo", help="demo, ImageNet (with --data-root) or folder:<path>")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per worker count")
    p.add_argument("--workers", type=int, nargs="+", default=sorted({0, 1, available_cores()}))
    p.add_argument("--out", default="benchmarks/results/data_speed.json")
    args = p.parse_args()

    torch.set_num_threads(1)  # as in a worker: the transform runs single-threaded
    tf = pretrain_transform(args.img_size, (0.08, 1.0), (3 / 4, 4 / 3), "random", 0.5, IMAGENET_MEAN, IMAGENET_STD)
    dataset = build_dataset(args.dataset, args.data_root, "train", tf, demo_samples=args.batch * (args.batches + 2))
    need = args.batch * (args.batches + 1)
    if len(dataset) < need:
        raise SystemExit(f"the data set has {len(dataset)} images; --batch x (--batches + 1) = {need} are needed")
    rows = []
    print(f"{args.dataset}, {args.img_size} px, batch {args.batch}, {available_cores()} cores ({cpu_model()})")
    for w in args.workers:
        rate = measure(dataset, w, args.batch, args.batches)
        rows.append({"workers": w, "img_per_s": rate, "img_per_s_per_worker": rate / max(w, 1)})
        print(f"  {w:2d} workers: {rate:8.1f} img/s ({rate / max(w, 1):.1f} per worker)")
    result = {"dataset": args.dataset, "img_size": args.img_size, "batch": args.batch, "rows": rows,
              "cores": available_cores(), "cpu_model": cpu_model(), "torch": torch.__version__,
              "mae_lite": mae_lite.__version__, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
