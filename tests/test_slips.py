"""A user's slip loses nothing (docs/cluster.md): a fresh run over a checkpoint is refused (or moves it aside with
--overwrite), one run per output folder (a lock naming its holder; a stale one taken over), a full disk while saving
is one line with its own exit status and the last checkpoint intact, no progress-bar frames in a log file, and
--resume of a finished run says so."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mae_lite.cli.train as train_cli
from mae_lite.engine import checkpoint as checkpoint_mod
from mae_lite.engine import loop
from mae_lite.engine.checkpoint import load_checkpoint, save_checkpoint
from mae_lite.engine.dist import DistEnv
from mae_lite.engine.run_folder import LOCK_NAME, LOCK_STALE_S, RunLock
from mae_lite.errors import UserError
from mae_lite.recipes import Finetune
from _proc import run_process

HOST = socket.gethostname()
CKPT = "last_epoch_ckpt.pth.tar"
TINY = ["depth=1", "demo_samples=16", "num_workers=0", "vis_images=0", "enable_tensorboard=False"]


def args(out: Path, *extra: str, epochs: int = 1, options: tuple = ()) -> list[str]:
    return ["-d", "cpu", "-f", "mae_lite_demo", "-b", "8", "-e", str(epochs), *extra, "--exp-options",
            f"output_dir={out}", "exp_name=run", *TINY, *options]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch run: <out>/run/last_epoch_ckpt.pth.tar (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("finished")
    assert train_cli.main(args(out)) == 0
    return out


@pytest.fixture
def copied(finished, tmp_path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "notice: CUDA is not available" not in line]
    assert len(err) == 1, err
    return err[0]


# ----- 1. a fresh run over a checkpoint ----------------------------------------------------------------------
def test_a_fresh_run_over_a_checkpoint_is_refused_in_one_line_and_nothing_changes(copied, capsys):
    folder = copied / "run"
    before = (folder / CKPT).read_bytes()
    logs = sorted(folder.glob("train_log-*.txt"))
    assert train_cli.main(args(copied)) == 2  # the same command again, without --resume
    line = _one_line(capsys)
    assert f"{folder} already holds a run (last_epoch_ckpt.pth.tar: finished, 1 of 1 epochs)" in line, line
    assert "--resume" in line and "another exp_name" in line and "--overwrite" in line and "nothing is deleted" in line
    assert (folder / CKPT).read_bytes() == before and sorted(folder.glob("train_log-*.txt")) == logs
    assert not (folder / LOCK_NAME).exists()  # the refused run let go of the folder
    # an interrupted run's checkpoint says where it stopped
    ckpt = load_checkpoint(folder / CKPT)
    save_checkpoint({**ckpt, "start_epoch": 0, "iteration": 1, "config": {**ckpt["config"], "max_epoch": 8}},
                    folder / CKPT)
    assert train_cli.main(args(copied, epochs=8)) == 2
    assert "interrupted at iteration 1 of epoch 1 of 8" in _one_line(capsys)


def test_fine_tuning_over_a_checkpoint_is_refused_too_naming_its_folder_option(copied):
    ft = copied / "run" / "ft_eval"
    ft.mkdir()
    shutil.copy(copied / "run" / CKPT, ft / CKPT)
    recipe = Finetune(pretrain_exp_name="run", save_folder_prefix="ft_", output_dir=str(copied), dataset="demo",
                      img_size=32, patch_size=4, depth=1, num_classes=13, demo_samples=16, num_workers=0,
                      batch_size=8, max_epoch=1, enable_tensorboard=False)
    with pytest.raises(UserError, match="another save_folder_prefix, or start over with --overwrite"):
        loop.train(recipe, DistEnv())


def test_overwrite_starts_over_and_moves_the_old_checkpoint_aside(copied, capsys):
    folder = copied / "run"
    before = (folder / CKPT).read_bytes()
    assert train_cli.main(args(copied, "--overwrite")) == 0
    moved = list(folder.glob("overwritten-*/" + CKPT))
    assert len(moved) == 1 and moved[0].read_bytes() == before  # kept whole, under a timestamped folder
    assert load_checkpoint(folder / CKPT)["start_epoch"] == 1
    assert f"checkpoints are moved to {moved[0].parent}" in capsys.readouterr().out
    assert train_cli.main(args(copied, "--overwrite", "--resume")) == 2
    assert "give one of them" in _one_line(capsys)


# ----- 5. --resume of a finished run ------------------------------------------------------------------------
def test_resume_of_a_finished_run_says_so_and_exits_0(copied, capsys):
    folder = copied / "run"
    before, logs = (folder / CKPT).read_bytes(), sorted(folder.glob("train_log-*.txt"))
    assert train_cli.main(args(copied, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"run {folder} already finished 1 of 1 epochs (last loss " in out, out
    assert "nothing to do; raise -e to train longer" in out and "nan" not in out
    assert (folder / CKPT).read_bytes() == before and sorted(folder.glob("train_log-*.txt")) == logs


# ----- 2. one run per output folder -------------------------------------------------------------------------
def _lock(folder: Path, host: str, pid: int, age_s: float = 0.0, **job) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "since": "2026-12-04 10:00:00",
                                "command": "ssl_train -e 400", **job}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_folder_in_use_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        lock = _lock(tmp_path / "run", HOST, sleeper.pid)
        assert train_cli.main(args(tmp_path)) == 2
        line = _one_line(capsys)
        assert f"is in use by another run: pid {sleeper.pid} on host {HOST} since 2026-12-04 10:00:00" in line, line
        assert "ssl_train -e 400" in line and lock.exists()  # the holder's lock stays
        _lock(tmp_path / "run", "node-elsewhere", 4242)  # a live lock of another host sharing the file system
        assert train_cli.main(args(tmp_path)) == 2
        line = _one_line(capsys)
        assert "pid 4242 on host node-elsewhere" in line and f"delete {lock}" in line, line
    finally:
        sleeper.kill()
        sleeper.wait()
    _lock(tmp_path / "run", HOST, sleeper.pid)  # that process is gone: its lock is stale
    assert train_cli.main(args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"took over the lock {lock} of a run that is gone (pid {sleeper.pid} on host {HOST}" in out
    assert not lock.exists() and (tmp_path / "run" / CKPT).is_file()  # released at the end


def test_lock_of_another_host_not_refreshed_is_stale_and_ours_is_refreshed(tmp_path, monkeypatch):
    _lock(tmp_path, "node-elsewhere", 4242, age_s=LOCK_STALE_S + 60)
    monkeypatch.setattr("mae_lite.engine.run_folder.LOCK_BEAT_S", 0.05)
    held = RunLock(tmp_path).acquire()
    assert "pid 4242 on host node-elsewhere" in held.notice and "not refreshed for 11 minutes" in held.notice
    os.utime(held.path, (0, 0))
    time.sleep(0.5)
    assert time.time() - held.path.stat().st_mtime < 5  # the heartbeat keeps it fresh during long evaluations
    with pytest.raises(UserError, match=f"pid {os.getpid()} on host {HOST}"):  # this live process holds it
        RunLock(tmp_path).acquire()
    held.release()
    assert not held.path.exists()


def test_a_lock_of_an_earlier_attempt_of_this_slurm_job_is_stale(tmp_path, monkeypatch):
    """A job requeued after a node failure starts on another node while its old lock is fresh: the same job id with
    a lower restart count is an attempt SLURM has ended. Another step of the same attempt is refused."""
    _lock(tmp_path, "node-elsewhere", 4242, job="777", restarts=[0, 0])
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(UserError, match="pid 4242 on host node-elsewhere"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    held = RunLock(tmp_path).acquire()
    assert "an earlier attempt of SLURM job 777" in held.notice
    held.release()


# ----- 3. a full disk while saving --------------------------------------------------------------------------
class _FullAfter:
    """A file whose disk fills after `budget` bytes, as torch's zip writer meets it (ENOSPC from write)."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data) -> int:
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_disk_full_while_saving_is_one_line_exit_4_and_resume_continues_from_the_last_checkpoint(
        tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save(obj, f, *a, **kw):  # the second checkpoint (end of epoch 2) meets a full disk
        calls.append(1)
        return real_save(obj, _FullAfter(f, 4096) if len(calls) == 2 else f, *a, **kw)

    monkeypatch.setattr(checkpoint_mod.torch, "save", save)
    run = args(tmp_path, epochs=3, options=("dump_interval=1",))
    assert train_cli.main(run) == 4  # not 1 (a training error) nor 2 (bad input)
    line = _one_line(capsys)
    assert f"cannot write checkpoint {tmp_path / 'run' / CKPT}: no space left on the device (needs about " in line
    assert " free there); the last good checkpoint " in line and "then continue with --resume" in line, line
    assert load_checkpoint(tmp_path / "run" / CKPT)["start_epoch"] == 1  # intact and loadable
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith("train_log")) == [CKPT]
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)  # space freed
    assert train_cli.main(args(tmp_path, "--resume", epochs=3, options=("dump_interval=1",))) == 0
    assert load_checkpoint(tmp_path / "run" / CKPT)["start_epoch"] == 3


def _mount_tmpfs(folder: Path, size: int) -> None:
    folder.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no mount command here ({e}); the monkeypatched ENOSPC test covers the behaviour")
    if proc.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root with CAP_SYS_ADMIN: "
                    f"{proc.stderr.strip()[:100]}); the monkeypatched ENOSPC test covers the behaviour")


def test_disk_full_on_a_small_tmpfs(finished, tmp_path, capsys):
    """A real file system that holds one checkpoint and a half: the second write (temp file beside the first)
    fails with torch's own errors (ENOSPC, then its zip writer's RuntimeError)."""
    size = (finished / "run" / CKPT).stat().st_size
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, size * 3 // 2)
    try:
        assert train_cli.main(args(disk, epochs=3, options=("dump_interval=1",))) == 4
        line = _one_line(capsys)
        assert "no space left on the device" in line and f"the last good checkpoint {disk / 'run' / CKPT}" in line
        assert load_checkpoint(disk / "run" / CKPT)["start_epoch"] == 1
        assert not list((disk / "run").glob(".*.tmp")) and not (disk / "run" / LOCK_NAME).exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=20)


# ----- 4. logs without progress-bar frames ------------------------------------------------------------------
def test_no_progress_bar_frames_when_stderr_is_not_a_terminal(tmp_path, capfd):
    assert train_cli.main(args(tmp_path, options=("print_interval=1",))) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err  # tqdm's frames would be here (stderr is a file)
    for i in (1, 2):  # the log lines carry what the bar showed: loss, lr, speed, eta (and the data wait)
        assert f"[1/1] it {i}/2 | loss " in out
    assert " img/s | data wait " in out and "| eta 00:" in out


def test_the_bar_shows_on_a_terminal_on_the_main_rank_only(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert loop.show_bar(DistEnv()) and not loop.show_bar(DistEnv(rank=1, world_size=2))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not loop.show_bar(DistEnv())


# ----- 2 + 3 on two processes: every rank stops, rank 0 speaks, nobody waits ---------------------------------
FULL_AT_SECOND_SAVE = '''
import errno
import torch
from mae_lite.recipes import MaeLiteDemo

_real, _calls = torch.save, []


def _save(obj, f, *args, **kwargs):  # checkpoints only (gathering the random states pickles tensors too)
    _calls.append(isinstance(obj, dict) and "optimizer" in obj)
    if _calls[-1] and sum(_calls) == 2:
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    return _real(obj, f, *args, **kwargs)


torch.save = _save


class Exp(MaeLiteDemo):
    pass
'''


def test_two_processes_stop_together_on_a_folder_in_use_and_on_a_full_disk(tmp_path, monkeypatch):
    recipe = tmp_path / "full_disk.py"
    recipe.write_text(FULL_AT_SECOND_SAVE)
    cmd = [sys.executable, "-m", "mae_lite.cli.train", "-d", "cpu:2", "-f", str(recipe), "-b", "8", "-e", "2",
           "--exp-options", f"output_dir={tmp_path}", "exp_name=run", *TINY, "dump_interval=1"]
    monkeypatch.setenv("MAE_LITE_DIST_TIMEOUT", "90")  # a rank left waiting would end the test, not hang it
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _lock(tmp_path / "run", HOST, sleeper.pid)
        proc = run_process(cmd, timeout=120)
    finally:
        sleeper.kill()
        sleeper.wait()
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and len(errors) == 1 and f"pid {sleeper.pid} on host {HOST}" in errors[0], \
        proc.stderr[-3000:]
    (tmp_path / "run" / LOCK_NAME).unlink()
    t0 = time.monotonic()
    proc = run_process(cmd, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 4 and len(errors) == 1, proc.stderr[-3000:]
    assert "rank 0 on host" in errors[0] and "no space left on the device" in errors[0]
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 60
    assert load_checkpoint(tmp_path / "run" / CKPT)["start_epoch"] == 1
    assert not list((tmp_path / "run").glob(".*.tmp")) and not (tmp_path / "run" / LOCK_NAME).exists()


def test_smoke_starts_over_removing_only_its_previous_runs(tmp_path):
    """ssl_smoke trains into the same folders each time: it clears its own earlier runs (not a fresh run over them)."""
    from mae_lite.cli.smoke import _clear_previous

    (tmp_path / "mae" / "ft_eval").mkdir(parents=True)
    _clear_previous(tmp_path)
    assert (tmp_path / "mae").is_dir()  # no step log of a smoke here: not ours to remove
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "01_pre-train.txt").write_text("")
    _clear_previous(tmp_path)
    assert not (tmp_path / "mae").exists()
