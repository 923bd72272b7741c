"""The prepared GPU check: what the CPU test suite cannot show, most telling first, inside one device command.

    python benchmarks/gpu_check.py --out DIR                 # on a GPU machine (GPU 0), every step
    python benchmarks/gpu_check.py --cpu --out DIR           # the same steps at toy sizes on the CPU
    python benchmarks/gpu_check.py --dry-run                 # the steps' commands; runs nothing
    python benchmarks/gpu_check.py --only probe step_eager   # some steps (names below)

Steps, each a subprocess under its own timeout (a failing step is recorded and the check goes on):
  probe             versions, /dev/shm, open-file limit, one nvJPEG decode, one tiny torch.compile
  step_eager        MAE-Tiny 224 px bf16 step on synthetic data, batch 256 / 512 / 1024, eager (step_speed.py)
  jpegs             a folder of ImageNet-like 500x375 JPEGs made here (--images, 10 class folders)
  folder_workers    ssl_train -f mae_lite on that folder, --amp, loader workers decode (eager)
  folder_gpu_decode the same with decode_on_device=True (workers read bytes, the GPU decodes)
  shards            ssl_prepare of the folder at --max-side 320
  shards_workers    ssl_train on those shards (eager)
  step_compiled     the synthetic step with torch.compile at batch 512
  <best>_compiled   the fastest real-data run again with compile=True
  pytest_cuda       the suite's CUDA-marked tests (per-test timeout, survives a collection error)
  gpu_decode        data_speed.py: batched decode + crop on the GPU over many batches
  finetune_ema      fine-tuning steps with model_ema=True from folder_workers' checkpoint; eval_ema: ssl_eval --ema
No step runs past --limit seconds from the start: its timeout is cut to what is left, a step with under 20 s left
is skipped. The results: <out>/gpu_check.json (a small summary: status, seconds and parsed numbers per step, the
versions) and <out>/gpu_check_logs.tgz (every log and benchmark JSON, no checkpoints or data). Work files go to
--work (default benchmarks/results/gpu_check).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
E2E_GOAL = 20000  # img/s, JPEG files to optimizer step, bf16 + compile, one H200 (issue 20)
STEP_GOAL_FACTOR = 3  # the synthetic step at least 3x the end-to-end goal


@dataclass
class Sizes:
    """The check's sizes: the real ones on a GPU, toy ones on the CPU (the script's own check)."""
    device: list[str]
    bench_device: str
    arch: list[str]  # --exp-options for every run
    batch: int
    sweep: str  # step_eager's batches
    bench: list[str]  # step_speed's other options
    images: int
    epochs: int
    workers: int
    ft_steps: int
    decode: list[str]  # data_speed's options for the decode row

    @staticmethod
    def of(cpu: bool, images: Optional[int], workers: Optional[int]) -> "Sizes":
        if cpu:
            return Sizes(["-d", "cpu"], "cpu", ["img_size=32", "patch_size=4", "depth=2"], 8, "8,16",
                         ["--img-size", "32", "--steps", "2", "--warmup", "1", "--peak-size", "256"],
                         images or 64, 1, workers if workers is not None else 2, 2,
                         ["--device", "cpu-decode", "--images", "32", "--per-row", "32", "--rounds", "1",
                          "--batch", "16", "--decode-batches", "2"])
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        return Sizes(["-d", "0"], "cuda", [], 512, "256,512,1024", ["--steps", "30", "--warmup", "5"],
                     images or 10240, 3, workers if workers is not None else max(1, cores - 2), 20,
                     ["--device", "cuda", "--per-row", "300", "--rounds", "1", "--batch", "256",
                      "--decode-batches", "40"])


@dataclass
class Step:
    name: str
    timeout: int
    command: Callable[[], Optional[list[str]]]  # None: skipped (the reason in `why`)
    parse: Callable[[str, Path], dict] = lambda text, work: {}
    why: str = ""


@dataclass
class Check:
    args: argparse.Namespace
    sizes: Sizes
    work: Path
    t0: float = field(default_factory=time.time)
    results: dict = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.work / "data"

    def left(self) -> float:
        return self.args.limit - (time.time() - self.t0)


# ----- parsing what the steps printed --------------------------------------------------------------------
def train_numbers(log: str) -> dict:
    """img/s and data-wait share of the periodic log lines (the first line of a run is start-up, left out of the
    steady figures), the final loss, the compiled-graph count and the data the runs report."""
    lines = re.findall(r"\| loss ([-+0-9.eEnaif]+) \| lr \S+ \| ([0-9.]+) img/s \| data wait (\d+)%", log)
    speeds = [float(s) for _, s, _ in lines]
    waits = [int(w) for _, _, w in lines]
    steady = speeds[1:] or speeds
    done = re.findall(r"done: (\d+) epochs, last loss ([-+0-9.eEnaif]+)", log)
    graphs = re.findall(r"torch\.compile compiled (\d+) graph", log)
    top1 = re.findall(r"Top1: ([0-9.]+)", log)
    return {"log_lines": len(lines),
            "img_per_s_steady": statistics.median(steady) if steady else None,
            "img_per_s_max": max(speeds) if speeds else None,
            "data_wait_pct_steady": statistics.median(waits[1:] or waits) if waits else None,
            "all_losses_finite": all(abs(float(v)) < float("inf") for v, _, _ in lines) if lines else None,
            "epochs_done": int(done[-1][0]) if done else None, "final_loss": float(done[-1][1]) if done else None,
            "compiled_graphs": int(graphs[-1]) if graphs else (0 if "compiled no graph" in log else None),
            "top1": float(top1[-1]) if top1 else None}


def pytest_numbers(log: str) -> dict:
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed)", log)}
    return {"counts": counts, "failed_tests": re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)[:20]}


def json_file(name: str, keys: tuple[str, ...]) -> Callable[[str, Path], dict]:
    def parse(text: str, work: Path) -> dict:
        path = work / name
        if not path.is_file():
            return {}
        data = json.loads(path.read_text())
        return {k: data.get(k) for k in keys if k in data}

    return parse


def step_rows(name: str) -> Callable[[str, Path], dict]:
    keep = ("batch", "img_per_s", "share_of_matmul_bound", "achieved_gflops", "compile_s", "peak_memory_gib")

    def parse(text: str, work: Path) -> dict:
        out = json_file(name, ("matmul_peak_gflops", "amp_dtype", "compiled", "gpu_model"))(text, work)
        path = work / name
        if path.is_file():
            out["rows"] = [{k: r.get(k) for k in keep} for r in json.loads(path.read_text()).get("rows", [])]
        return out

    return parse


# ----- running one step ----------------------------------------------------------------------------------
def run_step(check: Check, step: Step) -> None:
    log = check.work / f"{step.name}.log"
    cmd = step.command()
    if cmd is None:
        check.results[step.name] = {"status": f"skipped: {step.why}"}
        print(f"== {step.name}: skipped ({step.why})", flush=True)
        return
    if check.args.dry_run:
        print(f"{step.name} (timeout {step.timeout}s): {shlex.join(cmd)}")
        check.results[step.name] = {"status": "dry-run"}
        return
    limit = int(min(step.timeout, check.left()))
    if limit < 20:
        check.results[step.name] = {"status": "skipped: time limit"}
        print(f"== {step.name}: skipped (the {check.args.limit}s limit is reached)", flush=True)
        return
    print(f"== {step.name} (timeout {limit}s): {shlex.join(cmd)}", flush=True)
    t = time.time()
    rc = run_with_timeout(cmd, log, limit)
    status = {0: "ok", None: "timeout"}.get(rc, "failed")
    text = log.read_text(errors="replace") if log.is_file() else ""
    row = {"status": status, "rc": rc, "seconds": round(time.time() - t, 1)}
    try:
        row.update(step.parse(text, check.work))
    except (ValueError, KeyError, OSError) as e:  # a half-written result: record why, go on
        row["parse_error"] = str(e)
    check.results[step.name] = row
    print(f"   {status} (rc {rc}, {row['seconds']} s) {json.dumps({k: v for k, v in row.items() if k not in ('status', 'rc', 'seconds')})[:600]}")
    for line in text.splitlines()[-3:]:
        print(f"   | {line[:200]}")
    sys.stdout.flush()


def run_with_timeout(cmd: list[str], log: Path, limit: float) -> Optional[int]:
    """The command's exit code, or None when it ran past `limit` (then SIGTERM, and SIGKILL 15 s later, to its
    whole process group: loader workers and compile workers included)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
            return None


# ----- the steps -----------------------------------------------------------------------------------------
def train_cmd(check: Check, name: str, dataset: str, *extra: str) -> list[str]:
    s = check.sizes
    return [PY, "-m", "mae_lite.cli.train", *s.device, "--amp", "-f", "mae_lite", "-b", str(s.batch),
            "-e", str(s.epochs), "--exp-options", *s.arch, f"dataset={dataset}", f"num_workers={s.workers}",
            "warmup_epochs=1", "print_interval=5", "vis_images=0", "enable_tensorboard=False",
            f"output_dir={check.work / 'runs'}", f"exp_name={name}", *extra]


def best_real_run(check: Check) -> Optional[str]:
    runs = {k: v.get("img_per_s_steady") or 0 for k, v in check.results.items()
            if k in ("folder_workers", "folder_gpu_decode", "shards_workers") and v.get("status") == "ok"}
    return max(runs, key=runs.get) if runs and max(runs.values()) > 0 else None


REAL_RUNS = {  # name: (dataset under the data folder, extra options)
    "folder_workers": ("folder:{data}/jpegs", ()),
    "folder_gpu_decode": ("folder:{data}/jpegs", ("decode_on_device=True",)),
    "shards_workers": ("wds:{data}/shards320", ()),
}


def steps(check: Check) -> list[Step]:
    s, work, data = check.sizes, check.work, check.data
    compile_on = not check.args.cpu or check.args.compile_on_cpu
    bench = [PY, "benchmarks/step_speed.py", "--device", s.bench_device, "--amp-dtype", "bf16", *s.bench]
    pretrain_ckpt = work / "runs" / "folder_workers" / "last_epoch_ckpt.pth.tar"
    ft_ckpt = work / "runs" / "folder_workers" / "ema_eval" / "last_epoch_ckpt.pth.tar"
    pytest_timeout = (["--timeout=90"] if _has_module("pytest_timeout") else [])

    def real(name: str, *more: str, exp: str = "") -> Callable[[], list[str]]:
        dataset, extra = REAL_RUNS[name]
        return lambda: train_cmd(check, exp or name, dataset.format(data=data), *extra, *more)

    def compiled_run() -> Optional[list[str]]:
        best = best_real_run(check) if not check.args.dry_run else "folder_workers"
        return real(best, "compile=True", exp=f"{best}_compiled")() if best else None

    ft = [PY, "-m", "mae_lite.cli.train", *s.device, "--amp", "-f", "finetuning", "-b", str(s.batch), "-e", "1",
          "--ckpt", str(pretrain_ckpt), "--exp-options", *s.arch, "dataset=demo",
          f"demo_samples={s.batch * s.ft_steps}", "warmup_epochs=0", "pretrain_exp_name=folder_workers",
          "save_folder_prefix=ema_", "model_ema=True", f"num_workers={s.workers}", "print_interval=5",
          "enable_tensorboard=False", f"output_dir={work / 'runs'}"]
    ev = [PY, "-m", "mae_lite.cli.eval", *s.device, "-b", str(s.batch), "-f", "finetuning", "--ema", "--ckpt",
          str(ft_ckpt), "--exp-options", *s.arch, "dataset=demo", f"demo_samples={s.batch * 2}",
          f"num_workers={s.workers}"]
    train_parse = lambda text, w: train_numbers(text)  # noqa: E731
    plan = [
        Step("probe", 60, lambda: [PY, __file__, "--probe", str(work / "probe.json")],
             json_file("probe.json", ("versions", "gpu", "dev_shm", "nofile", "cores", "nvjpeg", "compile_s"))),
        Step("step_eager", 150, lambda: [*bench, "--batch", s.sweep, "--out", str(work / "step_eager.json")],
             step_rows("step_eager.json")),
        Step("jpegs", 90, lambda: [PY, __file__, "--make-jpegs", str(data / "jpegs"), str(s.images)],
             lambda text, w: {"made": text.strip().splitlines()[-1] if text.strip() else ""}),
        Step("folder_workers", 120, real("folder_workers"), train_parse),
        Step("folder_gpu_decode", 120, real("folder_gpu_decode"), train_parse),
        Step("shards", 120, lambda: [PY, "-m", "mae_lite.cli.prepare", "--src", f"folder:{data / 'jpegs'}", "--out",
                                     str(data / "shards320"), "--max-side", "320", "--no-progress",
                                     "--workers", str(max(1, s.workers))]),
        Step("shards_workers", 120, real("shards_workers"), train_parse),
        Step("step_compiled", 300, lambda: [*bench, "--batch", str(s.batch), "--compile",
                                            "--out", str(work / "step_compiled.json")] if compile_on else None,
             step_rows("step_compiled.json"), why="compiled steps are off in --cpu mode (--compile-on-cpu)"),
        Step("best_compiled", 300, lambda: compiled_run() if compile_on else None, train_parse,
             why="compiled steps are off in --cpu mode (--compile-on-cpu), or no real-data run finished"),
        Step("pytest_cuda", 180, lambda: [PY, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE",
                                          "--continue-on-collection-errors", *pytest_timeout, "tests"],
             lambda text, w: pytest_numbers(text)),
        Step("gpu_decode", 120, lambda: [PY, "benchmarks/data_speed.py", *s.decode, "--no-shards",
                                         "--out", str(work / "gpu_decode.json")],
             json_file("gpu_decode.json", ("rows", "mean_file_bytes"))),
        Step("finetune_ema", 150, lambda: ft if pretrain_ckpt.is_file() or check.args.dry_run else None, train_parse,
             why="no pre-training checkpoint (folder_workers failed)"),
        Step("eval_ema", 90, lambda: ev if ft_ckpt.is_file() or check.args.dry_run else None,
             lambda text, w: train_numbers(text), why="no fine-tuning checkpoint"),
    ]
    return plan


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ----- the probe and the JPEG folder (run as subprocesses of the check) ---------------------------------
def probe(out: Path) -> None:
    """What the machine is: versions, GPU, shared memory, open files; nvJPEG and inductor tried once each."""
    import importlib
    import shutil

    res: dict = {"versions": {"python": sys.version.split()[0]}, "cores": os.cpu_count()}
    for mod in ("torch", "torchvision", "timm", "PIL", "numpy", "triton", "pytest", "pycocotools", "webdataset",
                "cv2", "safetensors"):
        try:
            res["versions"][mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:  # noqa: BLE001 (a probe records, it does not stop)
            res["versions"][mod] = f"missing: {type(e).__name__}"
    if hasattr(os, "sysconf"):
        import resource

        res["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
    if Path("/dev/shm").is_dir():
        res["dev_shm"] = f"{shutil.disk_usage('/dev/shm').total / 2**30:.1f} GiB"
    import torch

    res["cuda"] = torch.version.cuda
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
    try:
        import mae_lite.recipes  # noqa: F401  (every recipe module imports)
        res["mae_lite_recipes"] = "ok"
    except Exception as e:  # noqa: BLE001
        res["mae_lite_recipes"] = f"{type(e).__name__}: {e}"
    try:
        from torchvision.io import decode_jpeg, read_file

        data = read_file(str(next((ROOT / "mae_lite" / "data" / "demo").glob("*.jpg"))))
        res["nvjpeg" if dev == "cuda" else "decode_jpeg"] = list(decode_jpeg([data], device=dev)[0].shape)
    except Exception as e:  # noqa: BLE001
        res["nvjpeg"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        t = time.time()
        y = torch.compile(lambda x: (x * 2).sin())(torch.ones(8, device=dev))
        res["compile_s"] = round(time.time() - t, 2)
        res["compile_ok"] = bool(torch.allclose(y, torch.ones(8, device=dev).mul(2).sin()))
    except Exception as e:  # noqa: BLE001
        res["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


def _one_jpeg(job: tuple) -> int:
    from PIL import Image

    src, size, path, i = job
    img = Image.open(src).convert("RGB")
    w, h = img.size  # a different crop per file, so no two files are the same
    dx, dy = (i * 7) % max(1, w // 8), (i * 5) % max(1, h // 8)
    img.crop((dx, dy, w - (w // 8 - dx), h - (h // 8 - dy))).resize(size, Image.BICUBIC).save(path, quality=90)
    return Path(path).stat().st_size


def make_jpegs(root: Path, n: int) -> None:
    """n JPEGs at 500x375 / 375x500, quality 90, from the embedded photos, in 10 class folders (all cores)."""
    from multiprocessing import Pool

    photos = sorted((ROOT / "mae_lite" / "data" / "demo").glob("*.jpg"))
    jobs = []
    for i in range(n):
        folder = root / f"c{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (500, 375) if (i // len(photos)) % 2 == 0 else (375, 500)
        jobs.append((str(photos[i % len(photos)]), size, str(folder / f"{i:06d}.JPEG"), i))
    t = time.time()
    with Pool(os.cpu_count() or 1) as pool:
        sizes = pool.map(_one_jpeg, jobs, chunksize=64)
    print(f"{n} JPEGs, mean {sum(sizes) / n / 1024:.1f} KiB, in {time.time() - t:.1f} s")


# ----- the summary ---------------------------------------------------------------------------------------
def summarize(check: Check) -> dict:
    r = check.results
    probe_row = r.get("probe", {})
    summary = {"mode": "cpu" if check.args.cpu else "gpu", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "commit": os.environ.get("MAE_LITE_COMMIT") or _git_commit(), "seconds_total": round(time.time() - check.t0),
               "limit_s": check.args.limit, "versions": probe_row.get("versions"), "gpu": probe_row.get("gpu"),
               "steps": r}
    eager = [row for row in r.get("step_eager", {}).get("rows", []) if row.get("img_per_s")]
    compiled = [row for row in r.get("step_compiled", {}).get("rows", []) if row.get("img_per_s")]
    real = {k: v.get("img_per_s_steady") for k, v in r.items()
            if k in (*REAL_RUNS, "best_compiled") and v.get("img_per_s_steady")}
    head = {"step_eager_best_img_per_s": max((x["img_per_s"] for x in eager), default=None),
            "step_compiled_img_per_s": max((x["img_per_s"] for x in compiled), default=None),
            "end_to_end_img_per_s": real or None}
    e2e = r.get("best_compiled", {}).get("img_per_s_steady")
    if summary["mode"] == "gpu":
        head["goal_end_to_end_met"] = None if e2e is None else e2e >= E2E_GOAL
        step = head["step_compiled_img_per_s"]
        head["goal_step_3x_met"] = None if step is None else step >= STEP_GOAL_FACTOR * E2E_GOAL
    summary["headline"] = head
    summary["all_ok"] = all(v.get("status") in ("ok", "dry-run") or v.get("status", "").startswith("skipped: compiled")
                            for v in r.values())
    return summary


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_results(check: Check, summary: dict, out: Path) -> None:
    """The summary JSON and one tarball of the logs and benchmark JSONs (no checkpoints, no data)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    with tarfile.open(out / "gpu_check_logs.tgz", "w:gz") as tar:
        for path in sorted(check.work.rglob("*")):
            if path.is_file() and path.suffix in (".log", ".json", ".txt") and check.data not in path.parents:
                tar.add(path, arcname=str(path.relative_to(check.work)))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check_logs.tgz'}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (checks the script itself)")
    p.add_argument("--dry-run", action="store_true", help="print the steps' commands, run nothing")
    p.add_argument("--out", default=None, help="folder for gpu_check.json + gpu_check_logs.tgz (default: --work)")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "gpu_check"),
                   help="logs, runs and data (data is deleted at the end unless --keep-data)")
    p.add_argument("--limit", type=int, default=int(os.environ.get("GPU_CHECK_LIMIT", 480)),
                   help="seconds the whole check may take (default 480, or $GPU_CHECK_LIMIT)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps (names in the module doc)")
    p.add_argument("--skip", nargs="+", default=[], help="steps not to run")
    p.add_argument("--images", type=int, default=None, help="JPEGs in the folder (default 10240; 64 with --cpu)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default cores - 2; 2 with --cpu)")
    p.add_argument("--compile-on-cpu", action="store_true", help="with --cpu: run the compiled steps too (minutes)")
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--probe", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--make-jpegs", nargs=2, metavar=("DIR", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        probe(Path(args.probe))
        return 0
    if args.make_jpegs:
        make_jpegs(Path(args.make_jpegs[0]), int(args.make_jpegs[1]))
        return 0
    work = Path(args.work)
    if not args.dry_run:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # a check starts clean (old runs would be resumed)
        work.mkdir(parents=True)
    check = Check(args, Sizes.of(args.cpu, args.images, args.workers), work)
    plan = steps(check)
    names = [s.name for s in plan]
    unknown = [n for n in (args.only or []) + args.skip if n not in names]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; the steps are: {', '.join(names)}")
    for step in plan:
        if (args.only is None or step.name in args.only) and step.name not in args.skip:
            run_step(check, step)
    if args.dry_run:
        return 0
    summary = summarize(check)
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=1))
    write_results(check, summary, Path(args.out) if args.out else work)
    if not args.keep_data:
        import shutil

        shutil.rmtree(check.data, ignore_errors=True)
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
