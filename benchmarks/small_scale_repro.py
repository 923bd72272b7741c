"""Small-scale version of the paper's first result, on Fashion-MNIST on the CPU (under an hour on 2 cores):
MAE-Lite pre-training, then the "impr." fine-tuning, against the same fine-tuning from scratch.

    python benchmarks/small_scale_repro.py                 # defaults sized for ~45 min on 2 cores
    python benchmarks/small_scale_repro.py --ft-epochs 3   # quicker, noisier

Needs the Fashion-MNIST IDX files (`apt-get install dataset-fashion-mnist`, or <data_root>/fashion_mnist/).
Writes <out>/results.md and <out>/results.json with final and best top-1 of each run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def ssl_train(args: list[str]) -> float:
    t = time.time()
    subprocess.run([sys.executable, "-m", "mae_lite.cli.train", "-d", "cpu", *args], check=True)
    return time.time() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/small_scale")
    p.add_argument("--train-size", type=int, default=6000, help="first N Fashion-MNIST training images")
    p.add_argument("--eval-size", type=int, default=2000, help="first N test images")
    p.add_argument("--depth", type=int, default=12, help="encoder depth (ViT-Tiny: 12 blocks, 12 heads, 192 dim)")
    p.add_argument("--pre-epochs", type=int, default=30)
    p.add_argument("--ft-epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    out = Path(a.out)
    common = [f"output_dir={out}", "dataset=FashionMNIST", "img_size=28", "patch_size=4", f"depth={a.depth}",
              f"train_limit={a.train_size}", f"num_workers={a.workers}", "print_interval=20"]
    ft = [*common, f"eval_limit={a.eval_size}", "num_classes=10", "eval_interval=1",
          f"warmup_epochs={max(1, a.ft_epochs // 5)}"]
    seconds = {}
    seconds["mae_pretrain"] = ssl_train(["-f", "mae_lite", "-b", str(a.batch), "-e", str(a.pre_epochs), "--exp-options",
                                         *common, "exp_name=mae_tiny", f"warmup_epochs={max(1, a.pre_epochs // 10)}",
                                         "lr=1.5e-3", "vis_images=4"])
    runs = {"mae_lite + impr.": "mae_tiny", "scratch + impr.": "scratch/vit_tiny"}
    results = {}
    for label, pre in runs.items():
        seconds[label] = ssl_train(["-f", "finetuning", "-b", str(a.batch), "-e", str(a.ft_epochs), "--exp-options",
                                    *ft, f"pretrain_exp_name={pre}"])
        ckpt = torch.load(out / pre / "ft_eval" / "last_epoch_ckpt.pth.tar", map_location="cpu", weights_only=True)
        log = sorted((out / pre / "ft_eval").glob("train_log-*.txt"))[-1].read_text()
        final = [line for line in log.splitlines() if "Top1:" in line][-1]
        results[label] = {"best_top1": ckpt["best_top1"], "best_epoch": ckpt["best_top1_epoch"],
                          "final_top1": float(final.split("Top1:")[1].split(",")[0]), "seconds": round(seconds[label])}
    record = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "settings": vars(a),
              "pretrain_seconds": round(seconds["mae_pretrain"]), "results": results}
    (out / "results.json").write_text(json.dumps(record, indent=2))
    lines = [f"Fashion-MNIST, first {a.train_size} train / {a.eval_size} test images, 28 px, patch 4, ViT depth {a.depth} "
             f"(192 dim, 12 heads); MAE-Lite pre-training {a.pre_epochs} epochs ({record['pretrain_seconds']} s), "
             f"impr. fine-tuning {a.ft_epochs} epochs, batch {a.batch}.", "",
             "| run | final top-1 | best top-1 (epoch) | fine-tune time |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['final_top1']:.2f} | {v['best_top1']:.2f} ({v['best_epoch']}) | {v['seconds']} s |"
              for k, v in results.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
