"""benchmarks/gpu_check.py, the prepared GPU check: what it parses, its timeouts, its time limit and what it writes
back (the whole check runs at toy size with `bash benchmarks/gpu_check.sh --cpu`, about 2 minutes)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


LOG = """[rank 0] 2026-12-04 18:46:00 | INFO | [1/3] it 5/20 | loss 1.2000 | lr 1.0e-04 | 900.0 img/s | data wait 40% | eta 00:01:00
[rank 0] 2026-12-04 18:46:01 | INFO | compile: torch.compile compiled 2 graph(s)
[rank 0] 2026-12-04 18:46:02 | INFO | [1/3] it 10/20 | loss 1.1000 | lr 2.0e-04 | 20000.5 img/s | data wait 10% | eta 00:00:30
[rank 0] 2026-12-04 18:46:03 | INFO | [1/3] it 15/20 | loss 1.0000 | lr 3.0e-04 | 24000.5 img/s | data wait 20% | eta 00:00:20
[rank 0] 2026-12-04 18:46:04 | INFO | [1/3] it 20/20 | loss nan | lr 4.0e-04 | 22000.0 img/s | data wait 30% | eta 00:00:10
[rank 0] 2026-12-04 18:46:05 | INFO | done: 3 epochs, last loss 0.9000, 00:00:07, checkpoint x
"""


def test_train_numbers_leave_the_start_up_line_out_of_the_steady_figures(gc):
    n = gc.train_numbers(LOG)
    assert n["log_lines"] == 4
    assert n["img_per_s_steady"] == 22000.0  # median of 20000.5, 24000.5, 22000.0 (900 is start-up)
    assert n["img_per_s_max"] == 24000.5
    assert n["data_wait_pct_steady"] == 20
    assert n["compiled_graphs"] == 2
    assert n["epochs_done"] == 3 and n["final_loss"] == 0.9
    assert n["all_losses_finite"] is False  # the nan line
    assert gc.train_numbers("warning: compile=True but torch.compile compiled no graph")["compiled_graphs"] == 0


def test_pytest_numbers_count_outcomes_and_name_failures(gc):
    text = "FAILED tests/test_cuda.py::test_a - boom\nERROR tests/test_x.py - ImportError\n" \
           "1 failed, 5 passed, 2 skipped, 570 deselected, 1 error in 40.1s"
    n = gc.pytest_numbers(text)
    assert n["counts"] == {"failed": 1, "passed": 5, "skipped": 2, "deselected": 570, "error": 1}
    assert n["failed_tests"] == ["tests/test_cuda.py::test_a", "tests/test_x.py"]


def test_a_step_past_its_timeout_is_killed_with_its_children(gc, tmp_path):
    marker = tmp_path / "child_alive"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w')\n")
    # the child outlives its parent unless the whole process group is killed
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(child)!r}]); time.sleep(60)"
    t = time.time()
    rc = gc.run_with_timeout([sys.executable, "-c", code], tmp_path / "x.log", limit=1)
    assert rc is None and time.time() - t < 20
    time.sleep(3.5)
    assert not marker.exists()
    assert gc.run_with_timeout([sys.executable, "-c", "print('hi')"], tmp_path / "y.log", limit=30) == 0
    assert (tmp_path / "y.log").read_text().strip() == "hi"


def _check(gc, tmp_path, **over):
    args = argparse.Namespace(**{"cpu": True, "dry_run": False, "limit": 100, "compile_on_cpu": False, **over})
    return gc.Check(args, gc.Sizes.of(True, None, None), tmp_path)


def test_steps_past_the_limit_are_skipped_and_fail_the_check(gc, tmp_path):
    check = _check(gc, tmp_path)
    check.t0 = time.time() - 95  # 5 s left of 100
    gc.run_step(check, gc.Step("late", 60, lambda: [sys.executable, "-c", "pass"]))
    assert check.results["late"]["status"] == "skipped: time limit"
    assert gc.summarize(check)["all_ok"] is False


def test_the_compiled_run_takes_the_fastest_real_data_path(gc, tmp_path):
    check = _check(gc, tmp_path)
    check.results = {"folder_workers": {"status": "ok", "img_per_s_steady": 5000.0},
                     "folder_gpu_decode": {"status": "ok", "img_per_s_steady": 12000.0},
                     "shards_workers": {"status": "failed", "img_per_s_steady": 30000.0}}
    assert gc.best_real_run(check) == "folder_gpu_decode"
    plan = {s.name: s for s in gc.steps(_check(gc, tmp_path, compile_on_cpu=True))}
    check.args.compile_on_cpu = True
    cmd = [s for s in gc.steps(check) if s.name == "best_compiled"][0].command()
    assert "decode_on_device=True" in cmd and "compile=True" in cmd and "exp_name=folder_gpu_decode_compiled" in cmd
    assert list(plan)[:3] == ["probe", "step_eager", "jpegs"] and list(plan)[-2:] == ["finetune_ema", "eval_ema"]


def test_results_come_back_as_a_summary_and_a_log_tarball_without_checkpoints(gc, tmp_path):
    work = tmp_path / "work"
    (work / "runs" / "r").mkdir(parents=True)
    (work / "data").mkdir()
    (work / "a.log").write_text("log")
    (work / "runs" / "r" / "train_log-1.txt").write_text("train")
    (work / "runs" / "r" / "last_epoch_ckpt.pth.tar").write_bytes(b"0" * 1000)
    (work / "data" / "index.json").write_text("{}")
    check = _check(gc, work)
    check.results = {"step_eager": {"status": "ok", "rows": [{"batch": 512, "img_per_s": 50000.0}]}}
    gc.write_results(check, gc.summarize(check), tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["headline"]["step_eager_best_img_per_s"] == 50000.0 and summary["all_ok"]
    with tarfile.open(tmp_path / "out" / "gpu_check_logs.tgz") as tar:
        assert sorted(tar.getnames()) == ["a.log", "runs/r/train_log-1.txt"]
