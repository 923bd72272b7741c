"""benchmarks/paper_findings.py without training: verdicts from numbers with spread, the table, the cache
decisions (skip / collect / resume / start / refuse), the plan, and the fine-tuning recipe's `load_blocks`."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mae_lite.engine.checkpoint import save_checkpoint
from mae_lite.errors import UserError
from mae_lite.recipes import Finetune

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_findings.py"


@pytest.fixture(scope="module")
def pf():
    spec = importlib.util.spec_from_file_location("paper_findings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_findings"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("paper_findings", None)


# ----- verdicts -----------------------------------------------------------------------------------------------------
def test_compare_needs_seed_ranges_apart(pf):
    assert pf.compare([72.0, 74.0], [70.0, 71.5]) == (pf.AGREES, "gap +2.2 points, seed ranges apart")
    verdict, why = pf.compare([72.0, 74.0], [70.0, 72.5])  # means 73.0 vs 71.25, but 72.0 < 72.5
    assert verdict == pf.DISAGREES and why == "gap +1.8 points, within the seed spread"
    assert pf.compare([60.0, 61.0], [62.0, 63.0]) == (pf.DISAGREES,
                                                      "gap -2.0 points: the opposite order, seed ranges apart")
    # the means lean the wrong way but the seeds overlap: not "the opposite order"
    assert pf.compare([36.9, 37.75], [35.35, 40.6]) == (pf.DISAGREES, "gap -0.6 points, within the seed spread")
    assert pf.compare([], [1.0])[0] == "not measured"
    assert pf.compare([5.0], [5.0]) == (pf.DISAGREES, "no difference")
    assert pf.compare([6.0], [5.0]) == (pf.AGREES, "gap +1.0 points, one seed, no spread")


def test_mean_sd_formats_sample_sd(pf):
    assert pf.mean_sd([70.0, 72.0]) == "71.0 ± 1.4"  # sample sd of 70, 72: sqrt(2) = 1.41
    assert pf.mean_sd([55.55]) == "55.5 (1 seed)"
    assert pf.mean_sd([]) == "not measured"
    assert pf.mean_sd([0.5, float("nan")]) == "undefined (no gain over scratch)"


def test_lower_layers_share_of_the_gain_per_seed(pf):
    scratch, full = [40.0, 42.0], [70.0, 72.0]  # gains 30 and 30
    by_k = {6: [61.0, 57.0]}  # shares 21/30 = 0.7 and 15/30 = 0.5
    assert pf.gain_shares(by_k, full, scratch, 6) == pytest.approx([0.7, 0.5])
    verdict, why, _ = pf.lower_layers_verdict(by_k, full, scratch, 12)
    assert verdict == pf.DISAGREES and "50%-70%" in why  # 0.5 is not more than half
    verdict, why, _ = pf.lower_layers_verdict({6: [61.0, 60.0]}, full, scratch, 12)
    assert verdict == pf.AGREES and why == "first 6 blocks keep 60%-70% of the gain"
    verdict, why, shares = pf.lower_layers_verdict({6: [61.0, 60.0]}, [70.0, 41.0], scratch, 12)  # no clear gain
    assert verdict == pf.DISAGREES and why.startswith("no clear gain") and math.isnan(shares[1])


def test_layer_curve_verdicts(pf):
    assert pf.halves([1.0, 0.8, 0.5, 0.2, 0.0]) == (0.9, 0.1)  # the middle layer of 5 is in neither half
    falling, flat = [0.9, 0.9, 0.8, 0.4, 0.3, 0.2], [0.5] * 6
    assert pf.falls_verdict([falling, falling])[0] == pf.AGREES
    assert pf.falls_verdict([falling, flat])[0] == pf.DISAGREES
    verdict, why = pf.knn_gap_verdict([[10.0, 50.0, 90.0]], [10.0, 45.0, 60.0])  # gap +5 in the middle, +30 last
    assert verdict == pf.AGREES and why.endswith("+5.0 -> +30.0")
    assert pf.knn_gap_verdict([[10.0, 50.0, 90.0]], [10.0, 20.0, 80.0])[0] == pf.DISAGREES  # +30 -> +10
    assert pf.upper_cka_verdict([0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.5, 0.4])[0] == pf.AGREES
    assert pf.upper_cka_verdict(None, [0.5])[0] == "not measured"


def test_markdown_table_format(pf):
    rows = [pf.Row("1. a | b", "78.0 vs 75.8", "setup", "71.0 ± 1.4 vs 50.0 ± 2.0", pf.AGREES, "gap")]
    lines = pf.markdown_table(rows).splitlines()
    assert lines[0] == "| claim | the paper | our setup | ours (mean ± sd over seeds) | verdict | why |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2] == "| 1. a \\| b | 78.0 vs 75.8 | setup | 71.0 ± 1.4 vs 50.0 ± 2.0 | **agrees** | gap |"


def test_table_rows_from_recorded_results(pf, tmp_path):
    sizes = pf.replace(pf.FULL, seeds=2)
    lay = pf.Layout(tmp_path)
    for key, values in {"ft/mae_tiny": [70.0, 71.0], "ft/scratch": [50.0, 52.0]}.items():
        for seed, v in enumerate(values):
            pf.write_json(lay.result(f"{key}/s{seed}"), {"key": key, "best_top1": v})
    rows = pf.table_rows(pf.Results(sizes, lay))
    assert rows[0].ours == "70.5 ± 0.7 vs 51.0 ± 1.4" and rows[0].verdict == pf.AGREES
    assert rows[0].paper == "ImageNet top-1 78.0 vs 75.8"
    assert all(r.verdict == "not measured" for r in rows[1:3])  # no transfer results yet
    pf.write_json(lay.result("ft/dmae_tiny/s0"), {"best_top1": 80.0})  # one seed of two: not a result yet
    assert pf.Results(sizes, lay).top1("ft/dmae_tiny") == []


# ----- cache --------------------------------------------------------------------------------------------------------
def test_decide_skip_collect_resume_start(pf):
    argv = ["-e", "2"]
    assert pf.decide({"key": "k", "argv": argv}, argv, None, 2) == "skip"
    assert pf.decide(None, argv, None, 2) == "start"
    assert pf.decide(None, argv, {"start_epoch": 2, "iteration": 0}, 2) == "collect"
    assert pf.decide(None, argv, {"start_epoch": 1, "iteration": 0}, 2) == "resume"
    assert pf.decide(None, argv, {"start_epoch": 2, "iteration": 5}, 2) == "resume"  # mid-epoch checkpoint
    with pytest.raises(SystemExit, match="other settings"):
        pf.decide({"key": "k", "argv": ["-e", "3"]}, argv, None, 2)


def test_finished_checkpoints(pf):
    assert not pf.finished(None)
    assert not pf.finished({"start_epoch": 3, "iteration": 4, "max_epoch": 3})
    assert not pf.finished({"start_epoch": 2, "iteration": 0, "max_epoch": 3})
    assert pf.finished({"start_epoch": 3, "iteration": 0, "max_epoch": 3})
    assert pf.finished({"start_epoch": 400})  # the original's files record no config


def _run(pf, tmp_path):
    return pf.Run("ft/x/s0", "finetune", "mae_lite.cli.train", ["-e", "2"], 1.0, tmp_path / "x", 2)


def test_execute_skips_a_recorded_run(pf, tmp_path, monkeypatch):
    lay, run = pf.Layout(tmp_path), _run(pf, tmp_path)
    pf.write_json(lay.result(run.key), {"key": run.key, "argv": run.argv, "best_top1": 61.0})
    monkeypatch.setattr(pf, "run_child", lambda *a: pytest.fail("a cached run must not run"))
    assert pf.execute(run, lay, 1, 1)["best_top1"] == 61.0


def test_execute_resumes_an_interrupted_run_and_records_it(pf, tmp_path, monkeypatch):
    lay, run = pf.Layout(tmp_path), _run(pf, tmp_path)
    run.run_dir.mkdir()
    torch.save({"start_epoch": 1, "iteration": 3, "config": {"max_epoch": 2}}, run.ckpt)
    calls = []

    def fake_run(cmd, log):  # what ssl_train --resume leaves: the finished checkpoint
        calls.append(cmd)
        torch.save({"start_epoch": 2, "iteration": 0, "best_top1": 63.5, "config": {"max_epoch": 2}}, run.ckpt)
        return 0

    monkeypatch.setattr(pf, "run_child", fake_run)
    record = pf.execute(run, lay, 1, 1)
    assert calls[0][-3:] == ["-e", "2", "--resume"] and calls[0][1:3] == ["-m", "mae_lite.cli.train"]
    assert record["best_top1"] == 63.5
    assert json.loads(lay.result(run.key).read_text())["argv"] == run.argv


def test_execute_refuses_to_resume_a_run_started_with_other_settings(pf, tmp_path, monkeypatch):
    lay, run = pf.Layout(tmp_path), _run(pf, tmp_path)
    run.run_dir.mkdir()
    torch.save({"start_epoch": 0, "iteration": 3, "config": {"max_epoch": 2}}, run.ckpt)
    pf.write_json(lay.result(run.key).with_suffix(".started.json"), {"key": run.key, "argv": ["-e", "5"]})
    monkeypatch.setattr(pf, "run_child", lambda *a: pytest.fail("must not resume with other settings"))
    with pytest.raises(SystemExit, match="started with other settings"):
        pf.execute(run, lay, 1, 1)


def test_execute_waits_for_an_unfinished_dependency(pf, tmp_path, monkeypatch):
    lay, run = pf.Layout(tmp_path), _run(pf, tmp_path)
    dep = tmp_path / "pre" / "last_epoch_ckpt.pth.tar"
    dep.parent.mkdir()
    torch.save({"start_epoch": 5, "iteration": 0, "config": {"max_epoch": 20}}, dep)
    run.needs = [dep]
    monkeypatch.setattr(pf, "run_child", lambda *a: pytest.fail("must wait for its pre-training"))
    assert pf.execute(run, lay, 1, 1) is None and not lay.result(run.key).exists()


def test_execute_stops_on_a_signalled_run(pf, tmp_path, monkeypatch):
    lay, run = pf.Layout(tmp_path), _run(pf, tmp_path)
    monkeypatch.setattr(pf, "run_child", lambda cmd, log: pf.STOPPED)
    with pytest.raises(pf.Interrupted):
        pf.execute(run, lay, 1, 1)
    assert not lay.result(run.key).exists()


def test_run_child_passes_sigterm_on(pf, tmp_path):
    """A SIGTERM to the script reaches the command, which here records it and exits like a stopped ssl_train."""
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: (print('got TERM', flush=True), sys.exit(3)))\n"
             "print('handler' + ' installed', flush=True)\ntime.sleep(60)\n")  # the log also holds this source
    log = tmp_path / "child.log"

    def terminate_when_ready():
        for _ in range(600):
            if log.is_file() and "handler installed" in log.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    threading.Thread(target=terminate_when_ready, daemon=True).start()
    try:
        assert pf.run_child([sys.executable, "-c", child], log) == pf.STOPPED
        assert pf.STOP_REQUESTED == [signal.SIGTERM]  # the plan stops after this command even if it finished
    finally:
        pf.STOP_REQUESTED.clear()
    assert "got TERM" in log.read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the script's own handler is put back


# ----- the plan -----------------------------------------------------------------------------------------------------
def test_plan_covers_every_claim_and_fits_the_budget(pf, tmp_path):
    lay = pf.Layout(tmp_path)
    runs = pf.plan(pf.FULL, lay)
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    assert {f"ft/mae_tiny/k{k}/s{s}" for k in (0, 3, 6, 9) for s in (0, 1)} <= set(keys)
    k3 = next(r for r in runs if r.key == "ft/mae_tiny/k3/s1")
    assert "load_blocks=3" in k3.argv and "seed=1" in k3.argv and lay.ckpt("mae_tiny") in k3.needs
    dmae = next(r for r in runs if r.key == "pretrain/dmae_tiny")
    assert f"teacher_ckpt_path={lay.ckpt('mae_small_teacher')}" in dmae.argv
    assert sum(r.step == "transfer" for r in runs) == 2 * 4 * 2  # 2 targets x 4 pre-trainings x 2 seeds
    assert sum(r.est_s for r in runs) / 60 <= 150  # the planned time of the defaults (2.5 h on 2 idle cores)
    assert sum(r.est_s for r in pf.plan(pf.QUICK, lay)) / 60 <= 15


def test_digits_tree_is_half_per_class(pf, tmp_path):
    pytest.importorskip("sklearn")
    splits = pf.digits_splits()
    assert (len(splits["train"]), len(splits["val"])) == (901, 896)
    assert splits["train"][0][0].shape == (28, 28) and splits["train"][0][0].dtype.name == "uint8"
    pf.write_png_tree(tmp_path / "digits", {"train": splits["train"][:3], "val": splits["val"][:2]})
    assert len(list((tmp_path / "digits" / "train").rglob("*.png"))) == 3


# ----- the recipe option ---------------------------------------------------------------------------------------------
SMALL = dict(dataset="demo", img_size=32, patch_size=8, depth=4, num_classes=3, num_workers=0)


def test_load_blocks_loads_only_the_first_k_blocks(tmp_path):
    torch.manual_seed(0)
    source = Finetune(pretrain_exp_name="p", **SMALL).build_model().model
    save_checkpoint({"model": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "pre.pth.tar")
    torch.manual_seed(1)
    recipe = Finetune(pretrain_exp_name="p", load_blocks=2, **SMALL)
    method = recipe.build_model()
    init = {k: v.clone() for k, v in method.model.state_dict().items()}
    summary = recipe.load_initial_weights(method, str(tmp_path / "pre.pth.tar"))
    assert summary.endswith("load_blocks=2: blocks 2..3 left at initialisation")
    now, src = method.model.state_dict(), source.state_dict()
    for key in now:
        expected = init if key.startswith(("blocks.2.", "blocks.3.", "head.")) else src
        assert torch.equal(now[key], expected[key]), key
    assert not torch.equal(src["blocks.3.attn.qkv.weight"], init["blocks.3.attn.qkv.weight"])  # the test can fail


def test_load_blocks_bounds(tmp_path):
    with pytest.raises(UserError, match="load_blocks must be >= 0"):
        Finetune(pretrain_exp_name="p", load_blocks=-1, **SMALL)
    recipe = Finetune(pretrain_exp_name="p", load_blocks=5, **SMALL)
    method = recipe.build_model()
    save_checkpoint({"model": {f"model.{k}": v for k, v in method.model.state_dict().items()}}, tmp_path / "p.pth.tar")
    with pytest.raises(UserError, match="exceeds the model's 4 blocks"):
        recipe.load_initial_weights(method, str(tmp_path / "p.pth.tar"))
