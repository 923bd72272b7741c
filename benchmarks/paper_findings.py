"""The paper's findings reproduced at small scale on real data, in one command (issue 16): a table beside the paper's.

    python benchmarks/paper_findings.py              # the full run (planned ~2.3 h on 2 idle cores; make findings)
    python benchmarks/paper_findings.py --dry-run    # print the plan and its time estimate, run nothing
    python benchmarks/paper_findings.py --quick      # every step at toy size (minutes), into outputs/findings_quick
    python benchmarks/paper_findings.py --only pretrain finetune --out /tmp/f   # some steps, elsewhere

Everything goes through the commands a user runs (`ssl_train` with the built-in recipes, `ssl_knn --layers`,
`ssl_vis_attn`, `ssl_vis_cka`), one subprocess each, logged to <out>/logs/. Every finished run leaves
<out>/results/<run>.json and is skipped next time; a run stopped part-way (Ctrl-C, a kill) continues with
`ssl_train --resume`; a run whose recorded command differs from today's plan is refused (use another --out).
The table goes to docs/findings.md (quick: <out>/findings.md), the plots next to it under findings/.

Data: Fashion-MNIST (Debian's dataset-fashion-mnist, installed here with apt-get when run as root) for
pre-training and the data-sufficient target; scikit-learn's 8x8 digits (pip install -e '.[findings]') and
few-shot subsets of held-out Fashion-MNIST test images as the data-insufficient targets, both written once as
class-per-folder PNG trees and read with dataset=folder:<path>.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("data", "pretrain", "finetune", "transfer", "analysis", "report")
STOPPED = 3  # ssl_train's exit status after a signal: checkpoint saved, --resume continues
AGREES, DISAGREES = "agrees", "does not agree at this scale"

# Seconds per image on two idle cores at 28 px / patch 4 (49 patches), fp32, from docs/reference/machine-notes
# (MAE-Tiny step ~200 img/s; ViT-Tiny fine-tuning ~85 img/s, ~68 with RandAugment in 2 loader workers, which the
# 41-minute small-scale run of 2026-11-29 reproduces) and FLOP ratios (MAE-Small ~4x MAE-Tiny; a distillation step
# adds the teacher's forward on the visible patches, ~1.3 MAE-Tiny steps). Only used to plan.
RATE = {"mae_tiny": 200.0, "mae_small": 60.0, "distill": 90.0, "finetune": 68.0, "forward": 300.0}
STARTUP_S = 8.0  # python + torch + timm + mae_lite imports and the data set, per command


# ----- sizes ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    pre_images: int = 3000  # first N Fashion-MNIST training images: pre-training and the labelled target
    pre_epochs: int = 20  # MAE-Tiny, D-MAE, D²-MAE
    teacher_epochs: int = 20  # MAE-Small teacher
    ft_epochs: int = 4  # impr. fine-tuning on the data-sufficient target (also the supervised pre-training)
    eval_images: int = 2000  # first N Fashion-MNIST test images: the evaluation of every Fashion-MNIST target
    heldout_images: Optional[int] = None  # test images after eval_images the few-shot draws from (None: all 8000)
    digits_epochs: int = 7
    digits_shots: Optional[int] = None  # images per class of the digits' training half (None: all 901)
    digits_eval: Optional[int] = None  # the first N of the digits' evaluation half (None: all 896)
    shots: int = 20  # images per class of the few-shot target
    fewshot_epochs: int = 30
    seeds: int = 2
    blocks: tuple[int, ...] = (0, 3, 6, 9)  # claim 3: pre-trained blocks loaded (12 = the ordinary fine-tuning)
    depth: int = 12
    pre_batch: int = 128
    ft_batch: int = 128
    transfer_batch: int = 64
    knn_images: int = 2000
    attn_images: int = 512
    cka_images: int = 1024
    workers: int = 2


FULL = Sizes()
QUICK = Sizes(pre_images=128, pre_epochs=1, teacher_epochs=1, ft_epochs=1, eval_images=64, heldout_images=300,
              digits_epochs=1, digits_shots=2, digits_eval=64, shots=2, fewshot_epochs=1, pre_batch=32, ft_batch=32,
              transfer_batch=16,
              knn_images=64, attn_images=16, cka_images=32, blocks=(0, 6))


# ----- the plan: one Run per command ---------------------------------------------------------------------------------
@dataclass
class Run:
    key: str  # unique name, also the result file's: pretrain/mae_tiny, ft/mae_tiny/s0, ...
    step: str  # one of STEPS
    module: str  # mae_lite.cli.train, mae_lite.cli.knn, ...
    argv: list[str]
    est_s: float
    run_dir: Optional[Path] = None  # ssl_train runs: the output folder holding last_epoch_ckpt.pth.tar
    max_epoch: int = 0
    needs: list[Path] = field(default_factory=list)  # checkpoints that must be complete first

    @property
    def ckpt(self) -> Optional[Path]:
        return self.run_dir / "last_epoch_ckpt.pth.tar" if self.run_dir else None


@dataclass
class Layout:
    out: Path

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def analysis(self) -> Path:
        return self.out / "analysis"

    @property
    def digits(self) -> Path:
        return self.out / "data" / "digits"

    @property
    def heldout(self) -> Path:
        return self.out / "data" / "fmnist_heldout"

    def result(self, key: str) -> Path:
        return self.out / "results" / (key.replace("/", "__") + ".json")

    def ckpt(self, name: str) -> Path:
        return self.runs / name / "last_epoch_ckpt.pth.tar"


PRETRAINED = {  # name: (run folder under runs/, the fine-tuning encoder_arch)
    "MAE-Tiny": ("mae_tiny", "vit_tiny_patch16"),
    "D-MAE-Tiny": ("dmae_tiny", "vit_tiny_patch16"),
    "D2-MAE-Tiny": ("d2mae_tiny", "vit_tiny_patch16"),
    "MAE-Small-teacher": ("mae_small_teacher", "vit_small_patch16"),
}


def supervised_dir(seed: int) -> str:
    return f"scratch/vit_tiny/ft_s{seed}_eval"


def common_options(s: Sizes, lay: Layout) -> list[str]:
    return [f"output_dir={lay.runs}", "dataset=FashionMNIST", "img_size=28", "patch_size=4", f"num_workers={s.workers}",
            "print_interval=20", "enable_tensorboard=False"]


def train_run(key, step, recipe, batch, epochs, options, run_dir, est_s, ckpt=None, needs=()) -> Run:
    argv = ["-d", "cpu", "-f", recipe, "-b", str(batch), "-e", str(epochs)]
    if ckpt:
        argv += ["--ckpt", str(ckpt)]
    return Run(key, step, "mae_lite.cli.train", argv + ["--exp-options", *options], est_s + STARTUP_S, run_dir,
               epochs, list(needs) + ([Path(ckpt)] if ckpt else []))


def pretrain_runs(s: Sizes, lay: Layout) -> list[Run]:
    base = [*common_options(s, lay), f"train_limit={s.pre_images}", "lr=1.5e-3", "ckpt_interval_minutes=10"]
    images = s.pre_images * s.pre_epochs
    warm = lambda e: f"warmup_epochs={max(1, e // 10)}"  # noqa: E731
    teacher = ["teacher_arch=mae_vit_small_patch16", f"teacher_ckpt_path={lay.ckpt('mae_small_teacher')}"]
    return [
        train_run("pretrain/mae_tiny", "pretrain", "mae_lite", s.pre_batch, s.pre_epochs,
                  [*base, warm(s.pre_epochs), "exp_name=mae_tiny", "vis_images=4"], lay.runs / "mae_tiny",
                  images / RATE["mae_tiny"]),
        train_run("pretrain/mae_small_teacher", "pretrain", "mae_lite", s.pre_batch, s.teacher_epochs,
                  [*base, warm(s.teacher_epochs), "exp_name=mae_small_teacher", "encoder_arch=mae_vit_small_patch16",
                   "vis_images=0"], lay.runs / "mae_small_teacher",
                  s.pre_images * s.teacher_epochs / RATE["mae_small"]),
        train_run("pretrain/dmae_tiny", "pretrain", "mae_lite_distill", s.pre_batch, s.pre_epochs,
                  [*base, warm(s.pre_epochs), "exp_name=dmae_tiny", "vis_images=0", *teacher], lay.runs / "dmae_tiny",
                  images / RATE["distill"], needs=[lay.ckpt("mae_small_teacher")]),
        train_run("pretrain/d2mae_tiny", "pretrain", "mae_lite_distill_d2", s.pre_batch, s.pre_epochs,
                  [*base, warm(s.pre_epochs), "exp_name=d2mae_tiny", "vis_images=0", *teacher], lay.runs / "d2mae_tiny",
                  images / RATE["distill"], needs=[lay.ckpt("mae_small_teacher")]),
    ]


def finetune_runs(s: Sizes, lay: Layout) -> list[Run]:
    """The data-sufficient target: impr. fine-tuning on the pre-training images with their labels."""
    base = [*common_options(s, lay), f"train_limit={s.pre_images}", f"eval_limit={s.eval_images}", "num_classes=10",
            f"eval_interval={s.ft_epochs}", f"warmup_epochs={max(1, s.ft_epochs // 5)}", "ckpt_interval_minutes=10"]
    est = s.pre_images * s.ft_epochs / RATE["finetune"] + s.eval_images / RATE["forward"]
    runs = []
    for seed in range(s.seeds):
        seeded = [*base, f"seed={seed}"]
        runs.append(train_run(f"ft/scratch/s{seed}", "finetune", "finetuning", s.ft_batch, s.ft_epochs,
                              [*seeded, "pretrain_exp_name=scratch/vit_tiny", f"save_folder_prefix=ft_s{seed}_"],
                              lay.runs / supervised_dir(seed), est))
        for name in ("MAE-Tiny", "D-MAE-Tiny", "D2-MAE-Tiny"):
            folder = PRETRAINED[name][0]
            runs.append(train_run(f"ft/{folder}/s{seed}", "finetune", "finetuning", s.ft_batch, s.ft_epochs,
                                  [*seeded, f"pretrain_exp_name={folder}", f"save_folder_prefix=ft_s{seed}_"],
                                  lay.runs / folder / f"ft_s{seed}_eval", est, ckpt=lay.ckpt(folder)))
        for k in s.blocks:
            runs.append(train_run(f"ft/mae_tiny/k{k}/s{seed}", "finetune", "finetuning", s.ft_batch, s.ft_epochs,
                                  [*seeded, "pretrain_exp_name=mae_tiny", f"save_folder_prefix=ft_k{k}_s{seed}_",
                                   f"load_blocks={k}"],
                                  lay.runs / "mae_tiny" / f"ft_k{k}_s{seed}_eval", est, ckpt=lay.ckpt("mae_tiny")))
    return runs


TRANSFER_MODELS = ("Supervised", "MAE-Tiny", "D-MAE-Tiny", "D2-MAE-Tiny")


def model_ckpt(name: str, lay: Layout) -> Path:
    if name == "Supervised":
        return lay.runs / supervised_dir(0) / "last_epoch_ckpt.pth.tar"
    return lay.ckpt(PRETRAINED[name][0])


def transfer_runs(s: Sizes, lay: Layout) -> list[Run]:
    """The data-insufficient targets, with the original's transfer recipe (SGD, layer decay 0.75, crop + flip) and
    lr 0.1 x batch / 512 (its CIFAR-100 command); the same settings for every pre-training."""
    base = [o for o in common_options(s, lay) if not o.startswith("dataset=")]
    base += [f"lr={0.1 * s.transfer_batch / 512:g}"]
    n_digits = 901  # the first half (rounded up) of each class of the 1,797 digits (see write_digits)
    digits = [f"dataset=folder:{lay.digits}"]
    digits += [f"few_shot={s.digits_shots}", "few_shot_seed=0"] if s.digits_shots else []
    digits += [f"eval_limit={s.digits_eval}"] if s.digits_eval else []
    targets = {
        "digits": (digits, s.digits_epochs, 10 * s.digits_shots if s.digits_shots else n_digits, s.digits_eval or 896),
        f"fewshot{s.shots}": ([f"dataset=folder:{lay.heldout}", f"few_shot={s.shots}", "few_shot_seed=0"],
                              s.fewshot_epochs, 10 * s.shots, s.eval_images),
    }
    runs = []
    for target, (opts, epochs, n_train, n_eval) in targets.items():
        est = n_train * epochs / RATE["finetune"] + n_eval / RATE["forward"]
        for name in TRANSFER_MODELS:
            for seed in range(s.seeds):
                folder = name.lower()
                runs.append(train_run(
                    f"transfer/{target}/{folder}/s{seed}", "transfer", "finetuning_transfer", s.transfer_batch, epochs,
                    [*base, *opts, f"seed={seed}", f"pretrain_exp_name=transfer/{folder}",
                     f"save_folder_prefix={target}_s{seed}_", f"eval_interval={epochs}",
                     f"warmup_epochs={max(1, epochs // 5)}"],
                    lay.runs / "transfer" / folder / f"{target}_s{seed}_eval", est, ckpt=model_ckpt(name, lay)))
    return runs


def analysis_models(s: Sizes, lay: Layout) -> dict[str, tuple[Optional[Path], list[str]]]:
    """name: (checkpoint or None for the random 'Init', extra recipe options)."""
    models: dict[str, tuple[Optional[Path], list[str]]] = {"Init": (None, [])}
    for seed in range(min(2, s.seeds)):
        models[f"Supervised-s{seed}"] = (lay.runs / supervised_dir(seed) / "last_epoch_ckpt.pth.tar", [])
    for name, (folder, arch) in PRETRAINED.items():
        models[name] = (lay.ckpt(folder), [f"encoder_arch={arch}"])
    return models


CKA_PAIRS = [("MAE-Tiny", "Supervised-s0"), ("MAE-Tiny", "Supervised-s1"), ("Supervised-s0", "Supervised-s1"),
             ("MAE-Tiny", "MAE-Small-teacher"), ("D-MAE-Tiny", "MAE-Small-teacher"),
             ("D2-MAE-Tiny", "MAE-Small-teacher")]
ATTN_MODELS = ("Init", "Supervised-s0", "MAE-Tiny", "D-MAE-Tiny", "D2-MAE-Tiny", "MAE-Small-teacher")


def analysis_runs(s: Sizes, lay: Layout) -> list[Run]:
    models = analysis_models(s, lay)
    opts = [*common_options(s, lay), "num_classes=10", f"eval_limit={s.eval_images}"]
    out = ["--device", "cpu", "--out", str(lay.analysis)]

    def model_args(name, suffix=""):
        ckpt, extra = models[name]
        return ([f"--ckpt{suffix}", str(ckpt)] if ckpt else []), extra, ([ckpt] if ckpt else [])

    runs = []
    for name in models:
        ck, extra, needs = model_args(name)
        runs.append(Run(f"analysis/knn/{name}", "analysis", "mae_lite.cli.knn",
                        ["-f", "finetuning", "-b", "128", "-n", str(s.knn_images), *out, *ck, "--save_name", name,
                         "--layers", "--exp-options", *opts, *extra],
                        STARTUP_S + 4 * s.knn_images / RATE["forward"], needs=needs))
    for name in ATTN_MODELS:
        ck, extra, needs = model_args(name)
        runs.append(Run(f"analysis/attn/{name}", "analysis", "mae_lite.cli.vis_attn",
                        ["-f", "finetuning", "-b", "64", "-n", str(s.attn_images), *out, *ck, "--save_name", name,
                         "--exp-options", *opts, *extra], STARTUP_S + 2 * s.attn_images / RATE["forward"], needs=needs))
    for a, b in CKA_PAIRS:
        if a not in models or b not in models:
            continue
        ck1, extra1, n1 = model_args(a, "1")
        ck2, extra2, n2 = model_args(b, "2")
        runs.append(Run(f"analysis/cka/{a}+{b}", "analysis", "mae_lite.cli.vis_cka",
                        ["-f", "finetuning", "-b", "64", "-n", str(s.cka_images), *out, "--exp-options", *opts,
                         *ck1, "--save_name1", a, *(["--exp-options1", *extra1] if extra1 else []),
                         *ck2, "--save_name2", b, *(["--exp-options2", *extra2] if extra2 else [])],
                        STARTUP_S + 3 * s.cka_images / RATE["forward"], needs=n1 + n2))
    return runs


def plan(s: Sizes, lay: Layout) -> list[Run]:
    return pretrain_runs(s, lay) + finetune_runs(s, lay) + transfer_runs(s, lay) + analysis_runs(s, lay)


# ----- cache decisions -----------------------------------------------------------------------------------------------
def decide(result: Optional[dict], argv: list[str], ckpt: Optional[dict], max_epoch: int) -> str:
    """What to do with a run: 'skip' (its result is recorded), 'collect' (training finished, result not yet
    recorded), 'resume' (a checkpoint of an unfinished run), 'start'. A result recorded for another command
    is refused: the cache would mix settings."""
    if result is not None:
        if result.get("argv") != argv:
            raise SystemExit(f"paper_findings: {result.get('key')} was run with other settings ({result.get('argv')}); "
                             "use another --out, or delete its results/ file and run folder to redo it")
        return "skip"
    if ckpt is None:
        return "start"
    if ckpt.get("start_epoch", 0) >= max_epoch and not ckpt.get("iteration"):
        return "collect"
    return "resume"


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, record: dict) -> None:
    """Atomic: a kill never leaves half a result that the next run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def checkpoint_summary(path: Optional[Path]) -> Optional[dict]:
    """The few fields of a checkpoint the cache and the table need (None: no checkpoint)."""
    if path is None or not path.is_file():
        return None
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    keep = ("start_epoch", "iteration", "best_top1", "best_top5", "best_top1_epoch")
    return {k: ckpt[k] for k in keep if k in ckpt} | {"max_epoch": (ckpt.get("config") or {}).get("max_epoch")}


def finished(state: Optional[dict]) -> bool:
    """A checkpoint written at the end of its run (not a mid-epoch one, not an unfinished run's). Checkpoints
    without a recorded config (the original's) count when they are not mid-epoch."""
    if state is None or state.get("iteration"):
        return False
    return state.get("max_epoch") is None or state.get("start_epoch", 0) >= state["max_epoch"]


# ----- running -------------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


STOP_REQUESTED: list[int] = []  # signals received while a command ran: stop after it (it may have finished anyway)


def execute(run: Run, lay: Layout, index: int, total: int, elapsed_s: float = 0.0) -> Optional[dict]:
    """Run (or skip, or resume) one command; its result record, or None when it failed or cannot run yet."""
    result_path = lay.result(run.key)
    action = decide(read_json(result_path), run.argv, checkpoint_summary(run.ckpt), run.max_epoch)
    tag = f"[{index}/{total}, {elapsed_s / 60:.0f} min] {run.key}"
    if action == "skip":
        print(f"{tag}: cached", flush=True)
        return read_json(result_path)
    started = result_path.with_suffix(".started.json")
    if action == "resume" and (read_json(started) or {}).get("argv", run.argv) != run.argv:
        raise SystemExit(f"paper_findings: {run.key} was started with other settings ({started}); use another --out, "
                         f"or delete {started} and {run.run_dir} to redo it")
    missing = [str(p) for p in run.needs if not finished(checkpoint_summary(p))]
    if missing:
        print(f"{tag}: not run, needs the finished run {missing[0]} (run its step first)", flush=True)
        return None
    seconds = None
    if action in ("start", "resume"):
        log = lay.out / "logs" / (run.key.replace("/", "__") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        if action == "start":
            write_json(started, {"key": run.key, "argv": run.argv, "started": now()})
        cmd = [sys.executable, "-m", run.module, *run.argv] + (["--resume"] if action == "resume" else [])
        print(f"{tag}: {action} (planned {run.est_s / 60:.1f} min; log {log})", flush=True)
        t0 = time.time()
        rc = run_child(cmd, log)
        seconds = time.time() - t0
        if rc == STOPPED:
            raise Interrupted(f"{run.key} stopped with its checkpoint saved; run the same command again to continue")
        if rc != 0:
            tail = log.read_text().strip().splitlines()[-1:] or ["(empty log)"]
            print(f"{tag}: FAILED (exit {rc}) after {seconds:.0f} s: {tail[0]}; log {log}", flush=True)
            return None
    record = {"key": run.key, "argv": run.argv, "seconds": seconds, "finished": now()}
    if run.ckpt is not None:
        state = checkpoint_summary(run.ckpt) or {}
        scored = run.step in ("finetune", "transfer")  # pre-training checkpoints hold no evaluation
        keys = ("best_top1", "best_top5", "start_epoch") if scored else ("start_epoch",)
        record.update({k: state.get(k) for k in keys})
    write_json(result_path, record)
    shown = f", top-1 {record['best_top1']:.2f}" if record.get("best_top1") is not None else ""
    print(f"{tag}: done" + (f" in {seconds:.0f} s" if seconds else " (collected)") + shown, flush=True)
    return record


def run_child(cmd: list[str], log: Path) -> int:
    """The command's exit status, its output appended to `log`. A SIGTERM to this script (a scheduler, `timeout`)
    is passed on, so the run saves its checkpoint and stops (STOPPED); Ctrl-C reaches the run from the terminal
    by itself, so this script only waits for it."""
    def forward(signum, frame):
        STOP_REQUESTED.append(signum)
        if signum != signal.SIGINT:
            proc.send_signal(signum)

    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    return STOPPED if STOP_REQUESTED and rc != 0 else rc


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----- data ----------------------------------------------------------------------------------------------------------
def ensure_fashion_mnist(data_root: str) -> None:
    """Debian's files (apt-get install as root when absent), or one line saying what to install."""
    sys.path.insert(0, str(ROOT))
    from mae_lite.data.fashion_mnist import candidate_dirs

    def present() -> bool:
        return any((d / "t10k-labels-idx1-ubyte.gz").is_file() or (d / "t10k-labels-idx1-ubyte").is_file()
                   for d in candidate_dirs(data_root))

    if present():
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("paper_findings: Fashion-MNIST not found: apt-get install -y dataset-fashion-mnist", flush=True)
        cmd = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
        if subprocess.run(cmd).returncode != 0:
            subprocess.run(["apt-get", "update"])
            subprocess.run(cmd)
        if present():
            return
    raise SystemExit("paper_findings: Fashion-MNIST not found: install it with `apt-get install dataset-fashion-mnist` "
                     "(as root), or put its four IDX files under <data_root>/fashion_mnist/")


def write_png_tree(root: Path, splits: dict[str, list[tuple[object, str]]]) -> None:
    """{split: [(uint8 HxW array, class folder)]} as <root>/<split>/<class>/<i>.png, made in a temporary folder
    and renamed, so a half-written tree is never used."""
    from PIL import Image

    if (root / "train").is_dir():
        return
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, items in splits.items():
        for i, (pixels, label) in enumerate(items):
            folder = tmp / split / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)


def digits_splits() -> dict[str, list]:
    """scikit-learn's 1,797 8x8 digits (0-16) as 28x28 uint8 images (bicubic), the first half of each class for
    training (901, rounded up) and the rest for evaluation (896)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("paper_findings: the digits target needs scikit-learn: pip install -e '.[findings]'") from None
    import numpy as np
    from PIL import Image

    digits = load_digits()
    splits: dict[str, list] = {"train": [], "val": []}
    for label in range(10):
        idx = [i for i, t in enumerate(digits.target) if t == label]
        half = (len(idx) + 1) // 2
        for j, i in enumerate(idx):
            small = Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8))
            big = np.asarray(small.resize((28, 28), Image.BICUBIC))
            splits["train" if j < half else "val"].append((big, str(label)))
    return splits


def heldout_splits(s: Sizes, data_root: str) -> dict[str, list]:
    """Fashion-MNIST test images: the first eval_images for evaluation, the next ones to draw the few shots from
    (never seen in pre-training, which reads the training split only)."""
    sys.path.insert(0, str(ROOT))
    from mae_lite.data.fashion_mnist import CLASSES, FashionMNIST

    test = FashionMNIST(data_root, train=False)
    names = [f"{i}_{c.replace('/', '-').replace(' ', '-')}" for i, c in enumerate(CLASSES)]
    stop = len(test.targets) if s.heldout_images is None else min(len(test.targets), s.eval_images + s.heldout_images)
    pick = lambda r: [(test.images[i], names[int(test.targets[i])]) for i in r]  # noqa: E731
    return {"train": pick(range(s.eval_images, stop)), "val": pick(range(s.eval_images))}


def prepare_data(s: Sizes, lay: Layout, data_root: str) -> None:
    ensure_fashion_mnist(data_root)
    write_png_tree(lay.digits, digits_splits())
    write_png_tree(lay.heldout, heldout_splits(s, data_root))


# ----- verdicts ------------------------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> str:
    if not values:
        return "not measured"
    if any(math.isnan(v) for v in values):  # a share of a gain that is not there
        return "undefined (no gain over scratch)"
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.1f} (1 seed)"
    return f"{m:.1f} ± {statistics.stdev(values):.1f}"


def compare(high: list[float], low: list[float]) -> tuple[str, str]:
    """The claim says `high` > `low`. It agrees when every seed of `high` beats every seed of `low` (the seed
    ranges do not overlap); otherwise it does not, said why."""
    if not high or not low:
        return "not measured", "a run is missing or failed"
    gap = statistics.fmean(high) - statistics.fmean(low)
    single = min(len(high), len(low)) == 1
    if min(high) > max(low):
        return AGREES, f"gap {gap:+.1f} points, " + ("one seed, no spread" if single else "seed ranges apart")
    if gap == 0:
        return DISAGREES, "no difference"
    if max(high) < min(low):
        return DISAGREES, f"gap {gap:+.1f} points: the opposite order, seed ranges apart"
    return DISAGREES, f"gap {gap:+.1f} points, within the seed spread"  # whichever way the means lean


def gain_shares(by_k: dict[int, list[float]], full: list[float], scratch: list[float], k: int) -> list[float]:
    """Per seed: the share of the full pre-training gain (over scratch) kept with only the first k blocks."""
    shares = []
    for acc_k, acc_full, acc_scratch in zip(by_k.get(k, []), full, scratch):
        gain = acc_full - acc_scratch
        shares.append((acc_k - acc_scratch) / gain if gain > 0 else float("nan"))
    return shares


def lower_layers_verdict(by_k, full, scratch, depth) -> tuple[str, str, list[float]]:
    """Claim 3: loading the lower half of the blocks keeps more than half the gain, for every seed (and the
    gain itself is real: full pre-training beats scratch beyond the seed spread)."""
    shares = gain_shares(by_k, full, scratch, depth // 2)
    gain_verdict, why = compare(full, scratch)
    if not shares:
        return "not measured", "a run is missing or failed", shares
    if gain_verdict != AGREES:
        return DISAGREES, f"no clear gain to share ({why})", shares
    if all(x > 0.5 for x in shares):
        return AGREES, f"first {depth // 2} blocks keep {min(shares):.0%}-{max(shares):.0%} of the gain", shares
    kept = f"first {depth // 2} blocks keep {min(shares):.0%}-{max(shares):.0%} of the gain"
    return DISAGREES, kept + " (not > 50 %)", shares


def halves(curve: list[float]) -> tuple[float, float]:
    """Means of the lower and the upper half of a per-layer curve (layer 0 = embeddings ... depth = final norm;
    the middle layer of an odd count in neither)."""
    n = len(curve)
    return statistics.fmean(curve[: n // 2]), statistics.fmean(curve[(n + 1) // 2:])


def falls_verdict(curves: list[list[float]]) -> tuple[str, str]:
    """Claim 4 (CKA to the supervised model): the upper half is less similar than the lower, for every curve."""
    if not curves:
        return "not measured", "a run is missing or failed"
    pairs = [halves(c) for c in curves]
    text = ", ".join(f"{lo:.2f} -> {hi:.2f}" for lo, hi in pairs)
    if all(hi < lo for lo, hi in pairs):
        return AGREES, f"lower-half -> upper-half mean CKA: {text}"
    return DISAGREES, f"lower-half -> upper-half mean CKA: {text}"


def knn_gap_verdict(supervised: list[list[float]], mae: list[float]) -> tuple[str, str]:
    """Claim 4 (per-layer kNN): MAE falls further behind the supervised model at the last layer than at the middle."""
    if not supervised or not mae:
        return "not measured", "a run is missing or failed"
    mid = len(mae) // 2
    gaps = [(sup[mid] - mae[mid], sup[-1] - mae[-1]) for sup in supervised]
    text = ", ".join(f"{a:+.1f} -> {b:+.1f}" for a, b in gaps)
    verdict = AGREES if all(b > a for a, b in gaps) else DISAGREES
    return verdict, f"supervised - MAE kNN top-1, middle -> last layer: {text}"


def upper_cka_verdict(distilled: Optional[list[float]], plain: Optional[list[float]]) -> tuple[str, str]:
    """Claim 5: the distilled student is closer to the teacher in its upper half than plain MAE (one run each)."""
    if not distilled or not plain:
        return "not measured", "a run is missing or failed"
    d, p = halves(distilled)[1], halves(plain)[1]
    why = f"upper-half CKA to the teacher {d:.2f} vs {p:.2f} (one run each, no spread)"
    return (AGREES if d > p else DISAGREES), why


# ----- the table -----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    claim: str
    paper: str
    setup: str
    ours: str
    verdict: str
    why: str


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Row]) -> str:
    head = "| claim | the paper | our setup | ours (mean ± sd over seeds) | verdict | why |\n|---|---|---|---|---|---|"
    body = [f"| {cell(r.claim)} | {cell(r.paper)} | {cell(r.setup)} | {cell(r.ours)} | **{cell(r.verdict)}** | "
            f"{cell(r.why)} |" for r in rows]
    return "\n".join([head, *body])


class Results:
    """The recorded results of a plan, looked up by run key."""

    def __init__(self, s: Sizes, lay: Layout):
        self.s, self.lay = s, lay

    def top1(self, prefix: str) -> list[float]:
        """best_top1 (the single, final evaluation) of every seed of a run family, in seed order."""
        values = []
        for seed in range(self.s.seeds):
            rec = read_json(self.lay.result(f"{prefix}/s{seed}"))
            if rec and rec.get("best_top1") is not None:
                values.append(float(rec["best_top1"]))
        return values if len(values) == self.s.seeds else []

    def knn(self, name: str) -> list[float]:
        rec = read_json(self.lay.analysis / f"knn_layers_{name}.json")
        return [float(r["top1"]) for r in rec["layers"]] if rec else []

    def cka_diag(self, a: str, b: str) -> Optional[list[float]]:
        path = self.lay.analysis / f"cka_{a}+{b}.npy"
        if not path.is_file():
            return None
        import numpy as np

        return [float(v) for v in np.diagonal(np.load(path))]

    def attention(self, name: str):
        path = self.lay.analysis / f"attn_{name}.npy"
        if not path.is_file():
            return None
        import numpy as np

        return np.load(path).mean(axis=2)  # [entropy, distance] x layers, mean over heads


def table_rows(r: Results) -> list[Row]:
    s = r.s
    ft_setup = (f"Fashion-MNIST, first {s.pre_images} train images (pre-training and labels), first {s.eval_images} "
                f"test images; ViT-Tiny depth {s.depth} at 28 px, patch 4; MAE-Lite {s.pre_epochs} ep, impr. "
                f"{s.ft_epochs} ep; {s.seeds} fine-tuning seeds of one pre-training")
    mae, scratch = r.top1("ft/mae_tiny"), r.top1("ft/scratch")
    dmae, d2 = r.top1("ft/dmae_tiny"), r.top1("ft/d2mae_tiny")
    rows = [Row("1. MAE-Lite pre-training + impr. beats impr. from scratch (data-sufficient)",
                "ImageNet top-1 78.0 vs 75.8", ft_setup, f"{mean_sd(mae)} vs {mean_sd(scratch)}",
                *compare(mae, scratch))]
    digits_train = f"{s.digits_shots}-shot" if s.digits_shots else "901 train"
    targets = {"digits": f"scikit-learn 8x8 digits at 28 px, {digits_train} / {s.digits_eval or 896} eval, "
                         f"{s.digits_epochs} ep",
               f"fewshot{s.shots}": f"Fashion-MNIST {s.shots}-shot (10 classes) from held-out test images, "
                                    f"{s.eval_images} eval, {s.fewshot_epochs} ep"}
    tr = lambda t, m: r.top1(f"transfer/{t}/{m.lower()}")  # noqa: E731
    for t, setup in targets.items():
        sup, m = tr(t, "Supervised"), tr(t, "MAE-Tiny")
        rows.append(Row(f"2. supervised pre-training transfers better than MAE ({t})",
                        "DeiT-Tiny ahead of MAE-Tiny on Flowers, Pets, Aircraft, Cars (transfer table)",
                        f"{setup}; transfer recipe; supervised = impr. from scratch on the pre-training images "
                        f"with labels (seed 0); {s.seeds} transfer seeds", f"{mean_sd(sup)} vs {mean_sd(m)}",
                        *compare(sup, m)))
    by_k = {k: r.top1(f"ft/mae_tiny/k{k}") for k in s.blocks}
    verdict, why, shares = lower_layers_verdict(by_k, mae, scratch, s.depth)
    curve = ", ".join(f"k={k}: {mean_sd(v)}" for k, v in by_k.items())
    rows.append(Row("3. lower layers matter more (data-sufficient): first k pre-trained blocks loaded, the rest "
                    "re-initialised",
                    "figure: loading the lower blocks keeps most of the gain (no table number)",
                    f"as 1 with `load_blocks=k` (the embeddings always load; k=0: nothing else); k={s.depth} is "
                    "row 1's run",
                    f"{curve}, k={s.depth}: {mean_sd(mae)}, scratch: {mean_sd(scratch)}; share of the gain at "
                    f"k={s.depth // 2}: {mean_sd([100 * x for x in shares])} %", verdict, why))
    sup_curves = [c for c in (r.cka_diag("MAE-Tiny", f"Supervised-s{i}") for i in range(min(2, s.seeds))) if c]
    rows.append(Row("4. MAE's higher layers learn weaker semantics: layer CKA to the supervised model falls",
                    "figure: CKA MAE-Tiny vs DeiT-Tiny high in lower, low in higher layers",
                    f"`ssl_vis_cka`, {s.cka_images} eval images, layers 0-{s.depth}, vs {len(sup_curves)} "
                    "supervised seed(s)",
                    "diagonal: " + "; ".join(" ".join(f"{v:.2f}" for v in c) for c in sup_curves) if sup_curves
                    else "not measured", *falls_verdict(sup_curves)))
    sup_knn = [c for c in (r.knn(f"Supervised-s{i}") for i in range(min(2, s.seeds))) if c]
    mae_knn = r.knn("MAE-Tiny")
    rows.append(Row("4. ... per-layer kNN: MAE falls behind the supervised model in the higher layers",
                    "(the paper's layer-wise analysis; no number)",
                    f"`ssl_knn --layers`, {s.knn_images} train / eval images", "MAE-Tiny per layer: "
                    + (" ".join(f"{v:.0f}" for v in mae_knn) if mae_knn else "not measured"),
                    *knn_gap_verdict(sup_knn, mae_knn)))
    rows.append(Row("5. D-MAE (distillation from a larger MAE) beats MAE (data-sufficient)",
                    "ImageNet 78.4 vs 78.0", f"as 1; teacher MAE-Small (384 dim, 12 blocks) pre-trained "
                    f"{s.teacher_epochs} ep on the same images", f"{mean_sd(dmae)} vs {mean_sd(mae)}",
                    *compare(dmae, mae)))
    for t in targets:
        d, m = tr(t, "D-MAE-Tiny"), tr(t, "MAE-Tiny")
        rows.append(Row(f"5. D-MAE transfers better than MAE ({t})", "larger gains on the small data sets",
                        "as 2", f"{mean_sd(d)} vs {mean_sd(m)}", *compare(d, m)))
    rows.append(Row("5. D-MAE's higher layers are closer to the teacher (CKA)", "figure (no number)",
                    f"`ssl_vis_cka` to the MAE-Small teacher, {s.cka_images} images", "see why",
                    *upper_cka_verdict(r.cka_diag("D-MAE-Tiny", "MAE-Small-teacher"),
                                       r.cka_diag("MAE-Tiny", "MAE-Small-teacher"))))
    rows.append(Row("D²-MAE (decoupled distillation, IJCV) beats MAE (data-sufficient)", "ImageNet 78.7 vs 78.0",
                    "as 5", f"{mean_sd(d2)} vs {mean_sd(mae)}", *compare(d2, mae)))
    for t in targets:
        d, m = tr(t, "D2-MAE-Tiny"), tr(t, "MAE-Tiny")
        rows.append(Row(f"D²-MAE transfers better than MAE ({t})", "(IJCV: gains on detection / segmentation)",
                        "as 2", f"{mean_sd(d)} vs {mean_sd(m)}", *compare(d, m)))
    return rows


# ----- plots ---------------------------------------------------------------------------------------------------------
def plot_all(r: Results, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def bars(ax, groups: dict[str, list[float]], title):
        for i, (label, vals) in enumerate(groups.items()):
            if vals:
                ax.bar(i, statistics.fmean(vals), color="#8fb3d9")
                ax.plot([i] * len(vals), vals, "k.", ms=8)
        ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(title)

    s = r.s
    fig, ax = plt.subplots(figsize=(6, 4))
    bars(ax, {"scratch": r.top1("ft/scratch"), "MAE-Tiny": r.top1("ft/mae_tiny"), "D-MAE": r.top1("ft/dmae_tiny"),
              "D²-MAE": r.top1("ft/d2mae_tiny")}, "Fashion-MNIST, impr. fine-tuning (bars: mean, dots: seeds)")
    save(fig, "finetune.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    ks = [*s.blocks, s.depth]
    accs = [r.top1(f"ft/mae_tiny/k{k}") for k in s.blocks] + [r.top1("ft/mae_tiny")]
    for k, vals in zip(ks, accs):
        ax.plot([k] * len(vals), vals, "k.", ms=8)
    means = [(k, statistics.fmean(v)) for k, v in zip(ks, accs) if v]
    if means:
        ax.plot(*zip(*means), "o-", label="first k blocks pre-trained")
    if r.top1("ft/scratch"):
        ax.axhline(statistics.fmean(r.top1("ft/scratch")), ls="--", c="gray", label="scratch")
    ax.set_xlabel("pre-trained blocks loaded (k)")
    ax.set_ylabel("top-1 (%)")
    ax.legend()
    ax.set_title("Claim 3: lower layers")
    save(fig, "load_blocks.png")

    targets = ["digits", f"fewshot{s.shots}"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, t in zip(axes, targets):
        bars(ax, {m: r.top1(f"transfer/{t}/{m.lower()}") for m in TRANSFER_MODELS}, f"transfer: {t}")
    save(fig, "transfer.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for a, b in CKA_PAIRS:
        diag = r.cka_diag(a, b)
        if diag:
            ax.plot(diag, "o-", ms=3, label=f"{a} vs {b}")
    ax.set_xlabel("layer (0: embeddings)")
    ax.set_ylabel("CKA (same layer)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    save(fig, "cka_diagonal.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in analysis_models(s, r.lay):
        curve = r.knn(name)
        if curve:
            ax.plot(curve, "o-", ms=3, label=name)
    ax.set_xlabel("layer (0: embeddings)")
    ax.set_ylabel("kNN top-1 (%)")
    ax.legend(fontsize=7)
    save(fig, "knn_layers.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in ATTN_MODELS:
        stats = r.attention(name)
        if stats is not None:
            axes[0].plot(stats[1], "o-", ms=3, label=name)
            axes[1].plot(stats[0], "o-", ms=3, label=name)
    axes[0].set_ylabel("mean attention distance (px)")
    axes[1].set_ylabel("mean attention entropy")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    save(fig, "attention.png")

    for a, b in CKA_PAIRS:  # the heatmaps ssl_vis_cka drew
        src = r.lay.analysis / f"cka_{a}+{b}.png"
        if src.is_file():
            shutil.copyfile(src, folder / src.name)
            written.append(folder / src.name)
    return written


# ----- the document --------------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        version = torch.__version__
    except ImportError:
        version = "?"
    return f"{cpu}, {os.cpu_count()} cores, torch {version}, {platform.platform()}"


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_doc(r: Results, table: str, doc: Path, plots: list[Path], wall: dict, quick: bool) -> None:
    rel = lambda p: os.path.relpath(p, doc.parent)  # noqa: E731
    lines = ["# The paper's findings at small scale", "",
             "Produced by `python benchmarks/paper_findings.py" + (" --quick" if quick else "")
             + "` (`make findings`); "
             "every number below comes from that run, nothing is tuned after the fact. A claim that does not "
             "reproduce at this scale is reported as such.", "",
             f"- date: {now()}", f"- commit: {commit()}", f"- machine: {machine()}",
             f"- measured wall time: {wall['runs_s'] / 60:.0f} min summed over the runs (each measured when it ran), "
             f"{wall['this_s'] / 60:.0f} min in the invocation that wrote this page; planned "
             f"{wall['planned_s'] / 60:.0f} min", f"- sizes: `{json.dumps(asdict(r.s))}`", "",
             "Verdict rule: a comparison agrees when every seed of the claimed-better side beats every seed of the "
             "other (seed ranges apart); anything else does not agree at this scale (why says whether the order is "
             "reversed or within the spread). Rows judged on one run say so.", "",
             table, ""]
    if quick:
        lines[2:2] = ["**Quick mode (toy sizes): these numbers only show that every step runs; they are not "
                      "findings.**",
                      ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({rel(p)})" for p in plots] + [""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, doc)


# ----- main ----------------------------------------------------------------------------------------------------------
def print_plan(runs: list[Run], lay: Layout) -> float:
    todo = [r for r in runs if read_json(lay.result(r.key)) is None]
    by_step: dict[str, float] = {}
    for r in todo:
        by_step[r.step] = by_step.get(r.step, 0.0) + r.est_s
    total = sum(by_step.values())
    parts = ", ".join(f"{k} {v / 60:.0f} min" for k, v in by_step.items())
    print(f"paper_findings: {len(runs)} runs, {len(runs) - len(todo)} cached; planned {total / 60:.0f} min on 2 idle "
          f"cores ({parts or 'nothing to run'})", flush=True)
    return total


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every step at toy size (minutes); not findings")
    p.add_argument("--only", nargs="+", choices=STEPS, default=None,
                   help="run only these steps (data is always prepared)")
    p.add_argument("--out", default=None,
                   help="working folder (default outputs/findings, quick: outputs/findings_quick)")
    p.add_argument("--doc", default=None, help="the page to write (default docs/findings.md, quick: <out>/findings.md)")
    p.add_argument("--data-root", default="./data", help="data_root of the recipes (Fashion-MNIST is also found in "
                                                         "Debian's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per comparison (default 2)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its planned time, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("paper_findings: --seeds must be >= 1")
        sizes = replace(sizes, seeds=args.seeds)
    lay = Layout(Path(args.out or ("outputs/findings_quick" if args.quick else "outputs/findings")).resolve())
    doc = Path(args.doc) if args.doc else (lay.out / "findings.md" if args.quick else ROOT / "docs" / "findings.md")
    steps = set(args.only or STEPS)
    whole_plan = plan(sizes, lay)
    runs = [r for r in whole_plan if r.step in steps]
    planned = print_plan(runs, lay)
    if args.dry_run:
        for r in runs:
            print(f"  {r.key}: {r.est_s / 60:.1f} min: python -m {r.module} {' '.join(r.argv)}")
        return 0
    t0 = time.time()
    prepare_data(sizes, lay, args.data_root)
    failed = []
    try:
        for i, run in enumerate(runs, 1):
            if execute(run, lay, i, len(runs), time.time() - t0) is None:
                failed.append(run.key)
            if STOP_REQUESTED:
                raise Interrupted(f"stopped by a signal after {run.key}; run the same command again to continue")
    except Interrupted as e:
        print(f"paper_findings: {e}", flush=True)
        return STOPPED
    except KeyboardInterrupt:
        print("paper_findings: interrupted; run the same command again to continue", flush=True)
        return STOPPED
    if "report" in steps:
        results = Results(sizes, lay)
        recorded = [read_json(lay.result(r.key)) for r in whole_plan]
        wall = {"runs_s": sum(rec.get("seconds") or 0 for rec in recorded if rec), "this_s": time.time() - t0,
                "planned_s": sum(r.est_s for r in whole_plan)}
        plots = plot_all(results, doc.parent / "findings")
        table = markdown_table(table_rows(results))
        write_doc(results, table, doc, plots, wall, args.quick)
        print(f"paper_findings: wrote {doc} and {len(plots)} plots under {doc.parent / 'findings'}")
        print(table)
    print(f"paper_findings: {time.time() - t0:.0f} s" + (f"; failed: {', '.join(failed)} (see {lay.out}/logs)"
                                                       if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
