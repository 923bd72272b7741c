"""Preemption: SIGTERM (or SIGUSR1, Ctrl-C) stops after the current step with a checkpoint, mid-epoch too, and
--resume continues bit for bit; checkpoints every N minutes; the launcher forwards the signal to its processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mae_lite.engine.checkpoint import load_checkpoint
from mae_lite.engine.dist import DistEnv
from mae_lite.engine.loop import train
from mae_lite.errors import Stopped
from mae_lite.recipes import MaeLiteDemo
from _proc import cli_env

TINY = dict(depth=2, demo_samples=64, batch_size=8, max_epoch=2, vis_images=0, print_interval=1, dump_interval=1)


class _Preempt(torch.utils.data.Dataset):
    """The training images, with a SIGTERM to the training process when image number `at` is loaded."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.calls, self.pid = inner, at, 0, os.getpid()

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.at:
            os.kill(self.pid, signal.SIGTERM)
        return self.inner[i]


class _PreemptedDemo(MaeLiteDemo):
    at: int = 64 + 20  # epoch 2 (64 images per epoch), so the replayed data order is not epoch 1's fresh one

    def build_datasets(self):
        ds = super().build_datasets()
        return {"train": _Preempt(ds["train"], self.at), "eval": None}


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("workers, at", [(0, 64 + 20), (2, 20)])  # loader workers restart (and count) every epoch
def test_sigterm_mid_epoch_saves_and_resume_is_bit_identical(tmp_path, workers, at):
    opts = dict(TINY, output_dir=str(tmp_path), num_workers=workers)
    train(MaeLiteDemo(**opts, exp_name="straight"), DistEnv())
    with pytest.raises(Stopped) as info:
        train(_PreemptedDemo(**opts, exp_name="cut", at=at), DistEnv())
    msg = str(info.value)
    assert "\n" not in msg and "stopped by SIGTERM" in msg and "--resume" in msg
    ckpt = load_checkpoint(tmp_path / "cut" / "last_epoch_ckpt.pth.tar")
    if workers == 0:  # image 84 is in batch 3 (images 17-24) of epoch 2: stop after that step
        assert (ckpt["start_epoch"], ckpt["iteration"]) == (1, 3) and "epoch 2, iteration 3" in msg
    assert ckpt["iters_per_epoch"] == 8 and ("epoch_rng" in ckpt) == (ckpt["iteration"] > 0)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    result = train(MaeLiteDemo(**opts, exp_name="cut"), DistEnv(), resume_requested=True)
    assert result.epochs_done == 2
    a, b = _weights(tmp_path / "straight" / "last_epoch_ckpt.pth.tar"), _weights(tmp_path / "cut" / "last_epoch_ckpt.pth.tar")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = "".join(p.read_text() for p in (tmp_path / "cut").glob("train_log-*.txt"))
    assert "replaying the data order of epoch" in log or ckpt["iteration"] == 0


def test_checkpoints_every_n_minutes_mid_epoch_change_nothing(tmp_path):
    train(MaeLiteDemo(**TINY, output_dir=str(tmp_path), num_workers=0, exp_name="plain"), DistEnv())
    train(MaeLiteDemo(**TINY, output_dir=str(tmp_path), num_workers=0, exp_name="often", ckpt_interval_minutes=1e-9),
          DistEnv())
    log = next((tmp_path / "often").glob("train_log-*.txt")).read_text()
    assert "epoch 1, iteration 1: checkpoint" in log and "epoch 2, iteration 7: checkpoint" in log
    a, b = _weights(tmp_path / "plain" / "last_epoch_ckpt.pth.tar"), _weights(tmp_path / "often" / "last_epoch_ckpt.pth.tar")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="ckpt_interval_minutes"):
        MaeLiteDemo(ckpt_interval_minutes=0)


def test_resume_mid_epoch_with_another_batch_size_is_refused(tmp_path):
    opts = dict(TINY, output_dir=str(tmp_path), num_workers=0, exp_name="cut")
    with pytest.raises(Stopped):
        train(_PreemptedDemo(**opts), DistEnv())
    with pytest.raises(Exception, match="in the middle of an epoch of 8 iterations, but this run has 4"):
        train(MaeLiteDemo(**{**opts, "batch_size": 16}), DistEnv(), resume_requested=True)


def test_two_processes_stop_on_a_signal_to_the_launcher_and_resume(tmp_path):
    """SIGTERM to `ssl_train -d cpu:2` reaches both training processes, which agree on the step, save, and exit
    with status 3; --resume finishes the run."""
    args = [sys.executable, "-m", "mae_lite.cli.train", "-d", "cpu:2", "-f", "mae_lite_demo", "-b", "8", "-e", "1",
            "--exp-options", f"output_dir={tmp_path}", "exp_name=ddp", "depth=2", "demo_samples=256", "num_workers=0",
            "print_interval=1", "vis_images=0"]
    env = cli_env()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until training steps are running, then signal the launcher only
            logs = list((tmp_path / "ddp").glob("train_log-*.txt"))
            if logs and " it 3/32 " in logs[0].read_text():
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, err[-2000:]
    assert "stopped by SIGTERM" in err and "continue with --resume" in err
    ckpt = load_checkpoint(tmp_path / "ddp" / "last_epoch_ckpt.pth.tar")
    assert len(ckpt["rng"]) == 2 and ckpt["iteration"] > 0 and ckpt["start_epoch"] == 0  # mid-epoch
    at = args.index("--exp-options")
    done = subprocess.run(args[:at] + ["--resume"] + args[at:], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(tmp_path / "ddp" / "last_epoch_ckpt.pth.tar")["start_epoch"] == 1
