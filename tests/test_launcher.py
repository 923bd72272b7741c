"""The launcher on clusters: one agreed error across ranks, srun without torchrun, -d defaults and notices, the
rendezvous address of a single-node spawn, loader workers per local process, the output folder."""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp

import mae_lite.cli.train as train_cli
from mae_lite.engine import dist as dist_mod
from mae_lite.engine.checkpoint import save_checkpoint
from mae_lite.engine.dist import (DeviceSpec, DistEnv, adopt_srun_env, cleanup, first_host, free_port, init_process,
                                  pg_timeout, rank_agreement)
from mae_lite.errors import UserError
from _proc import cli_env

HOST = socket.gethostname()
DEMO = ["-f", "mae_lite_demo", "-b", "8", "-e", "1"]
TINY = ["depth=2", "demo_samples=16", "num_workers=0", "vis_images=0"]


# ----- rank_agreement: 2 gloo processes, only rank 1 fails ---------------------------------------------------------
def _agreement_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MAE_LITE_DIST_TIMEOUT="60")
    env = init_process(rank, 2, 0, "cpu")
    seen = []
    for case in ("user_error_on_rank_1", "bug_on_rank_0", "no_error"):
        try:
            with rank_agreement(env, "setup"):
                if case == "user_error_on_rank_1" and rank == 1:
                    raise UserError("--resume: no checkpoint at /nowhere/last_epoch_ckpt.pth.tar")
                if case == "bug_on_rank_0" and rank == 0:
                    raise KeyError("boom")
            seen.append([case, "passed"])
        except Exception as e:  # noqa: BLE001 (what each rank raised is the result)
            seen.append([case, type(e).__name__, str(e)])
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    cleanup()


def test_rank_agreement_every_rank_raises_the_error_of_rank_1_naming_rank_and_host(tmp_path):
    ctx = mp.start_processes(_agreement_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.time() < deadline, "the ranks did not finish: a hang"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    msg = f"rank 1 on host {HOST}: --resume: no checkpoint at /nowhere/last_epoch_ckpt.pth.tar"
    assert r0[0] == r1[0] == ["user_error_on_rank_1", "UserError", msg]
    # a bug on rank 0 keeps its own exception there; rank 1 learns its type and first line
    assert r0[1] == ["bug_on_rank_0", "KeyError", "'boom'"]
    assert r1[1] == ["bug_on_rank_0", "UserError", f"rank 0 on host {HOST}: KeyError: 'boom'"]
    assert r0[2] == r1[2] == ["no_error", "passed"]


def test_rank_agreement_in_one_process_passes_the_error_through_untouched():
    err = KeyError("x")
    with pytest.raises(KeyError) as info:
        with rank_agreement(DistEnv(), "setup"):  # no process group exists: any collective would fail
            raise err
    assert info.value is err
    with rank_agreement(DistEnv(), "setup"):
        pass


def test_process_group_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("MAE_LITE_DIST_TIMEOUT", raising=False)
    assert pg_timeout() == datetime.timedelta(minutes=30)
    monkeypatch.setenv("MAE_LITE_DIST_TIMEOUT", "90")
    assert pg_timeout() == datetime.timedelta(seconds=90)
    monkeypatch.setenv("MAE_LITE_DIST_TIMEOUT", "soon")
    with pytest.raises(UserError, match="MAE_LITE_DIST_TIMEOUT='soon'"):
        pg_timeout()


# ----- srun without torchrun -------------------------------------------------------------------------------------
_SLURM = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "4",
          "SLURM_NTASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]",
          "SLURM_JOB_ID": "123456"}


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever the code under test writes into os.environ is removed afterwards."""
    for k in {*_LAUNCH_VARS, *_SLURM, *(k for k in os.environ if k.startswith("SLURM_"))}:
        monkeypatch.setenv(k, "")  # remembered as absent (or its old value) and restored at teardown
        monkeypatch.delenv(k)
    return monkeypatch


@pytest.mark.parametrize("nodes, first", [("gpu[07-09,12],cpu01", "gpu07"), ("node3", "node3"), ("a,b", "a"),
                                          ("r[2-3]-n[05,01]", "r2-n05")])
def test_first_host_of_a_slurm_host_list(nodes, first):
    assert first_host(nodes) == first


def test_srun_tasks_become_ranks_of_one_world(clean_env):
    for k, v in _SLURM.items():
        clean_env.setenv(k, v)
    assert adopt_srun_env()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                       "MASTER_PORT")} == {
        "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_the_batch_script_and_torchrun_are_not_srun_tasks(clean_env):
    # sbatch's own shell has SLURM_PROCID=0 and SLURM_NTASKS but no step: ssl_train spawns there as usual
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "8")
    assert not adopt_srun_env() and "RANK" not in os.environ
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")  # torchrun started by srun: torchrun's RANK wins
    clean_env.setenv("RANK", "5")
    assert not adopt_srun_env() and os.environ["RANK"] == "5"


def _srun_task(rank: int, port: int, output_dir: Path, options: tuple = ()) -> list[str]:
    env = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "127.0.0.1",
           "SLURM_JOB_ID": "1", "MASTER_PORT": str(port), "MAE_LITE_DIST_TIMEOUT": "60"}
    return ["env", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m", "mae_lite.cli.train", "-d", "cpu",
            *DEMO, "--exp-options", f"output_dir={output_dir}", *TINY, *options]


@pytest.mark.parametrize("failure", ["output_folder", "data"])
def test_srun_without_torchrun_forms_one_world_and_names_the_rank_that_failed(tmp_path, clean_env, failure):
    """Two srun tasks (no torchrun); on rank 1 only, the output folder cannot be created or the data folder is
    missing (say, on its node's disk). Both exit promptly with status 2, and rank 0 (which has both) prints rank 1's
    error with its host: the tasks formed one world and agreed before any collective that could hang."""
    import subprocess

    (tmp_path / "file").write_text("")
    port = free_port()
    bad = {"output_folder": (tmp_path / "file/x", ()),
           "data": (tmp_path / "out1", (f"dataset=folder:{tmp_path / 'missing'}",))}[failure]
    tasks = [_srun_task(0, port, tmp_path / "out0"), _srun_task(1, port, bad[0], bad[1])]
    base = {k: v for k, v in cli_env().items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
    procs = [subprocess.Popen(t, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base,
                              start_new_session=True) for t in tasks]
    try:
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert [p.returncode for p in procs] == [2, 2], results
    err0 = results[0][1]
    expected = {"output_folder": f"cannot create the output folder {tmp_path / 'file/x'}",
                "data": f"image folder not found: expected class sub-folders of images under {tmp_path / 'missing'}"}
    assert f"rank 1 on host {HOST}: {expected[failure]}" in err0
    assert "Traceback" not in err0 + results[1][1] and len(err0.strip().splitlines()) == 1


# ----- ssl_train's devices, rendezvous, notices ------------------------------------------------------------------
class _FakeSpawn:
    """Stands in for torch.multiprocessing.start_processes: records what the launcher would start."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, args, nprocs, join, start_method):
        self.calls.append({"nprocs": nprocs, "spec": args[1], "addr": os.environ.get("MASTER_ADDR"),
                           "port": os.environ.get("MASTER_PORT")})
        return type("Ctx", (), {"join": lambda self: True, "processes": []})()


def test_default_devices_are_every_visible_gpu(clean_env, tmp_path):
    spawn = _FakeSpawn()
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 3)
    clean_env.setattr(torch.multiprocessing, "start_processes", spawn)
    assert train_cli.main([*DEMO, "--exp-options", f"output_dir={tmp_path}"]) == 0  # no -d
    assert spawn.calls[0]["nprocs"] == 3 and spawn.calls[0]["spec"] == DeviceSpec("cuda", (0, 1, 2))
    assert train_cli.main(["-d", "0-1", *DEMO, "--exp-options", f"output_dir={tmp_path}"]) == 0
    assert spawn.calls[1]["spec"] == DeviceSpec("cuda", (0, 1))
    assert train_cli.main(["-d", "0-7", *DEMO, "--exp-options", f"output_dir={tmp_path}"]) == 2  # only 3 GPUs


def test_default_devices_without_cuda_fall_back_to_one_cpu_process(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert train_cli.device_spec(None) == DeviceSpec("cpu", (0,))
    assert "CUDA is not available, running on the CPU in one process" in capsys.readouterr().err


def test_single_node_spawn_ignores_a_stale_master_addr(clean_env, tmp_path):
    spawn = _FakeSpawn()
    clean_env.setenv("MASTER_ADDR", "10.255.0.7")  # left over from another job's script
    clean_env.setenv("MASTER_PORT", "1")
    clean_env.setattr(torch.multiprocessing, "start_processes", spawn)
    assert train_cli.main(["-d", "cpu:2", *DEMO, "--exp-options", f"output_dir={tmp_path}"]) == 0
    call = spawn.calls[0]
    assert call["addr"] == "127.0.0.1" and call["port"] not in ("1", None) and int(call["port"]) > 1023


@pytest.mark.parametrize("devices, notice", [("0-3", True), ("cpu", False)])
def test_devices_under_torchrun_are_ignored_with_a_notice(clean_env, tmp_path, capsys, devices, notice):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}.items():
        clean_env.setenv(k, v)
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    started = []
    clean_env.setattr(train_cli, "_worker", lambda index, args, spec, launcher=None: started.append((spec, launcher)))
    assert train_cli.main(["-d", devices, *DEMO, "--exp-options", f"output_dir={tmp_path}"]) == 0
    assert started == [(DeviceSpec("cpu", (0,)), "torchrun")]
    err = capsys.readouterr().err
    assert ("-d 0-3 is ignored under torchrun: it started 2 processes" in err) == notice


@pytest.mark.parametrize("kind, tuned", [("cpu", True), ("cuda", False)])
def test_allocator_tuning_runs_on_cpu_runs_only(monkeypatch, kind, tuned):
    calls = []
    monkeypatch.setattr(train_cli, "tune_allocator", lambda: calls.append(1))
    monkeypatch.setattr(train_cli, "init_process", lambda *a: DistEnv())
    monkeypatch.setattr(train_cli, "train", lambda *a, **k: None)
    args = train_cli.make_parser().parse_args(["-f", "mae_lite_demo", "--exp-options", "output_dir=/tmp/unused"])
    monkeypatch.setattr(train_cli, "make_output_dir", lambda path: None)
    train_cli._worker(0, args, DeviceSpec(kind, (0,)))
    assert bool(calls) == tuned


def test_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "out"
    assert train_cli.main(["-d", "cpu", *DEMO, "--exp-options", f"output_dir={bad}", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot create the output folder {bad}/" in err and "output_dir=" in err


# ----- ssl_eval: loader workers per local process ----------------------------------------------------------------
def test_eval_divides_loader_workers_by_the_local_processes(tmp_path, monkeypatch):
    import mae_lite.cli.eval as eval_cli

    net = timm.create_model("vit_tiny_patch16", img_size=32, patch_size=4, depth=2, num_classes=10)
    save_checkpoint({"model": {f"model.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "ft.pth.tar")
    seen = []

    class Enough(Exception):
        pass

    def fake_loader(dataset, batch, env, workers, **kw):
        seen.append(workers)
        raise Enough

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks of torchrun share this machine's 8 cores
    monkeypatch.setattr(dist_mod, "cpu_cores", lambda: 8)  # loader_workers reads the cores there
    monkeypatch.setattr(eval_cli, "eval_loader", fake_loader)
    with pytest.raises(Enough):
        eval_cli.main(["-d", "cpu", "-f", "finetuning", "--ckpt", str(tmp_path / "ft.pth.tar"), "--exp-options",
                       "dataset=demo", "img_size=32", "patch_size=4", "depth=2", "num_classes=10",
                       "num_workers=10"])
    assert seen == [2]


# ----- preemption under torchrun ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_to_torchrun_reaches_both_workers_which_save_within_its_grace_period(tmp_path, name):
    """torchrun forwards SIGTERM (and SIGINT, SIGHUP, SIGQUIT) as it is to its workers and SIGKILLs them
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (30 by default; 10 here, where torchrun reads it: torch 2.11 has
    neither it nor `--shutdown-timeout` and always waits 30 s): both stop after an agreed step and rank 0 saves a
    mid-epoch checkpoint within that window."""
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mae_lite.cli.train", "-d", "cpu", "-f", "mae_lite_demo", "-b", "8",
           "-e", "1", "--exp-options", f"output_dir={tmp_path}", "exp_name=tr", "depth=2", "demo_samples=512",
           "num_workers=0", "print_interval=1", "vis_images=0", "enable_tensorboard=False"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(cli_env(), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="10"), start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # training steps are running: signal torchrun only
            logs = list((tmp_path / "tr").glob("train_log-*.txt"))
            if logs and " it 3/64 " in logs[0].read_text():
                break
            time.sleep(0.2)
        proc.send_signal(getattr(signal, name))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"stopped by {name}" in err and "continue with --resume" in err, err[-3000:]
    ckpt = torch.load(tmp_path / "tr" / "last_epoch_ckpt.pth.tar", map_location="cpu", weights_only=False)
    assert 0 < ckpt["iteration"] < 64 and len(ckpt["rng"]) == 2  # mid-epoch, both ranks' random state
