"""`ssl_smoke`: the whole workflow on the embedded photos, on the CPU, in minutes, to validate a setup.

MAE-Lite pre-training -> impr. fine-tuning -> kNN -> linear probe -> attention distance/entropy -> layer
CKA (pre-trained vs fine-tuned) -> reconstructions -> timm export, each through the same command a user
runs, with a one-line verdict per step and a summary (markdown + JSON) at the end. The numbers say
that everything runs and connects, not how good the models are: 13 photos are not a benchmark.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from .common import run_cli

PROG = "ssl_smoke"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Run pre-training, fine-tuning, kNN, linear probe, attention and CKA "
                                                  "analysis, reconstructions and export on the embedded photos (CPU).")
    p.add_argument("--out", default="outputs/smoke", help="output folder (default outputs/smoke)")
    p.add_argument("--depth", type=int, default=4, help="ViT-Tiny blocks (default 4; 12 is the real depth)")
    p.add_argument("--epochs", type=int, default=10, help="pre-training epochs (fine-tuning and probe: 2 and 1)")
    p.add_argument("--samples", type=int, default=512, help="random crops of the photos per epoch (default 512)")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("-d", "--devices", default="cpu", help="cpu (default), cpu:N, or GPU ids as ssl_train takes them")
    return p


def _run(name: str, main: Callable[[list[str]], int], argv: list[str], log: Path) -> tuple[str, float]:
    """Run one command in-process, its output to `log`; return (its output, seconds) or raise one line."""
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(argv)
    seconds = time.perf_counter() - t
    text = buf.getvalue()
    log.write_text(text)
    if rc != 0:
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise UserError(f"step '{name}' failed (exit {rc}): {last[0][:200]}; full output in {log}")
    return text, seconds


def _clear_previous(out: Path) -> None:
    """Each smoke starts over: the run folder of an earlier smoke in `out` (recognised by its step log) is removed,
    since ssl_train refuses a fresh run over a checkpoint. Anything else under `out` is left alone."""
    import shutil

    if (out / "logs" / "01_pre-train.txt").is_file() and (out / "mae").is_dir():
        print(f"{PROG}: removing the previous smoke's runs in {out / 'mae'}", flush=True)
        shutil.rmtree(out / "mae")


def _last(pattern: str, text: str) -> Optional[float]:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def _main(argv: Optional[list[str]] = None) -> int:
    from .eval import main as ssl_eval
    from .export import main as ssl_export
    from .knn import main as ssl_knn
    from .train import main as ssl_train
    from .vis_attn import main as ssl_vis_attn
    from .vis_cka import main as ssl_vis_cka
    from .vis_recon import main as ssl_vis_recon

    a = make_parser().parse_args(argv)
    if a.depth < 1 or a.epochs < 1 or a.samples < a.batch_size:
        raise UserError(f"--depth and --epochs must be >= 1 and --samples >= -b, got {a.depth}, {a.epochs}, "
                        f"{a.samples} and {a.batch_size}")
    out = Path(a.out)
    logs = out / "logs"
    _clear_previous(out)
    logs.mkdir(parents=True, exist_ok=True)
    model = ["dataset=demo", "img_size=32", "patch_size=4", f"depth={a.depth}", f"demo_samples={a.samples}",
             "num_workers=2", f"output_dir={out}"]
    ft = [*model, "num_classes=13", "pretrain_exp_name=mae", "warmup_epochs=1", "eval_interval=1"]
    pre_ckpt = str(out / "mae" / "last_epoch_ckpt.pth.tar")
    ft_ckpt = str(out / "mae" / "ft_eval" / "last_epoch_ckpt.pth.tar")
    common = ["--device", "cpu" if a.devices.startswith("cpu") else "cuda"]
    steps = [
        ("pre-train (mae_lite)", ssl_train, ["-d", a.devices, "-f", "mae_lite_demo", "-b", str(a.batch_size), "-e",
                                             str(a.epochs), "--exp-options", *model, "exp_name=mae",
                                             "warmup_epochs=1"], r"\| loss ([\d.]+)", "last loss"),
        ("fine-tune (finetuning)", ssl_train, ["-d", a.devices, "-f", "finetuning", "-b", str(a.batch_size), "-e", "2",
                                               "--exp-options", *ft], r"Top1: ([\d.]+)", "top-1 (13 photos)"),
        ("evaluate (ssl_eval)", ssl_eval, ["-d", a.devices, "-f", "finetuning", "-b", str(a.batch_size), "--ckpt",
                                           ft_ckpt, "--exp-options", *ft], r"Top1: ([\d.]+)", "top-1"),
        ("kNN (ssl_knn)", ssl_knn, [*common, "-f", "finetuning", "--ckpt", pre_ckpt, "-b", str(a.batch_size), "--out",
                                    str(out / "vis"), "--exp-options", *ft, "global_pool=False"],
         r"kNN top-1: ([\d.]+)", "kNN top-1"),
        ("linear probe (linprobe)", ssl_train, ["-d", a.devices, "-f", "linprobe", "-b", str(a.batch_size), "-e", "1",
                                                "--exp-options", *ft, "lr=0.1"], r"Top1: ([\d.]+)", "top-1"),
        ("attention (ssl_vis_attn)", ssl_vis_attn, [*common, "-f", "finetuning", "--ckpt", pre_ckpt, "-n", "64",
                                                    "--out", str(out / "vis"), "--exp-options", *ft],
         r"mean distance per layer: ([\d.]+)", "layer-1 distance (px)"),
        ("CKA (ssl_vis_cka)", ssl_vis_cka, [*common, "-f", "finetuning", "-n", "64", "--out", str(out / "vis"),
                                            "--ckpt1", pre_ckpt, "--save_name1", "pretrained", "--ckpt2", ft_ckpt,
                                            "--save_name2", "finetuned", "--exp-options", *ft],
         r"CKA diagonal: ([\d.]+)", "layer-0 CKA"),
        ("reconstructions (ssl_vis_recon)", ssl_vis_recon, [*common, "-f", "mae_lite_demo", "--ckpt", pre_ckpt, "--out",
                                                            str(out / "vis"), "--exp-options", *model],
         None, None),
        ("export to timm (ssl_export)", ssl_export, ["--ckpt", ft_ckpt, "--out", str(out / "export"), "--exp-options",
                                                     *ft], None, None),
    ]
    rows = []
    for i, (name, main, args, pattern, what) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {name} ...", flush=True)
        text, seconds = _run(name, main, args, logs / f"{i:02d}_{name.split(' ')[0]}.txt")
        value = _last(pattern, text) if pattern else None
        shown = f"{what} {value:g}" if value is not None else "ok"
        rows.append({"step": name, "seconds": round(seconds, 1), "result": shown})
        print(f"      {shown} ({seconds:.0f} s)", flush=True)
    table = ["| step | result | seconds |", "|---|---|---|"] + [f"| {r['step']} | {r['result']} | {r['seconds']} |"
                                                              for r in rows]
    (out / "smoke.md").write_text("\n".join(table) + "\n")
    (out / "smoke.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(table))
    print(f"all {len(steps)} steps ran; outputs under {out}/, summary {out / 'smoke.md'}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
