"""End-to-end: ssl_train on the demo photos, checkpoints, resume, errors, DDP on CPU."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mae_lite.cli.train import main as ssl_train
from mae_lite.engine.checkpoint import load_checkpoint
from mae_lite.engine.dist import DistEnv
from mae_lite.engine.loop import train
from mae_lite.errors import NonFiniteLoss
from mae_lite.recipes import MaeLiteDemo
from _proc import run_process

TINY = ["depth=2", "demo_samples=64", "num_workers=0", "print_interval=1", "vis_images=2"]
TINY_WORKERS = [o if o != "num_workers=0" else "num_workers=2" for o in TINY]


def run(tmp_path: Path, *args: str, options=(), exp="run", tiny=TINY) -> int:
    return ssl_train(["-d", "cpu", "-f", "mae_lite_demo", *args, "--exp-options",
                      f"output_dir={tmp_path}", f"exp_name={exp}", *tiny, *options])


def test_cli_run_writes_checkpoint_logs_tensorboard_and_png(tmp_path):
    assert run(tmp_path, "-b", "16", "-e", "2") == 0
    out = tmp_path / "run"
    ckpt = load_checkpoint(out / "last_epoch_ckpt.pth.tar")
    assert ckpt["start_epoch"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "best_top1", "arch", "rng"} <= set(ckpt)
    keys = list(ckpt["model"])
    assert all(k.startswith("model.") for k in keys) and "model.decoder_pred.weight" in keys
    assert ckpt["arch"] == {"name": "mae_vit_tiny_patch16",
                            "kwargs": {"img_size": 32, "norm_pix_loss": True, "patch_size": 4, "depth": 2}}
    assert ckpt["scheduler"]["last_count"] == 2 * 64 // 16 - 1
    assert list(out.glob("train_log-*.txt")) and list(out.glob("tb_train-*/events.out.tfevents.*"))
    pngs = sorted(out.glob("reconstruction_ep*.png"))
    assert pngs and pngs[-1].read_bytes()[:4] == b"\x89PNG"
    log = next(out.glob("train_log-*.txt")).read_text()
    assert "mask_ratio" in log and "img/s" in log and "data wait" in log


@pytest.mark.parametrize("tiny", [TINY, TINY_WORKERS], ids=["no_workers", "2_workers"])
def test_resume_continues_bit_identically(tmp_path, tiny):
    assert run(tmp_path, "-b", "16", "-e", "2", exp="straight", tiny=tiny) == 0
    assert run(tmp_path, "-b", "16", "-e", "1", exp="split", tiny=tiny) == 0
    assert run(tmp_path, "-b", "16", "-e", "2", "--resume", exp="split", tiny=tiny) == 0
    a = load_checkpoint(tmp_path / "straight" / "last_epoch_ckpt.pth.tar")
    b = load_checkpoint(tmp_path / "split" / "last_epoch_ckpt.pth.tar")
    assert b["start_epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_from_explicit_path_and_missing(tmp_path, capsys):
    assert run(tmp_path, "-b", "16", "-e", "1", exp="a") == 0
    src = tmp_path / "a" / "last_epoch_ckpt.pth.tar"
    assert run(tmp_path, "-b", "16", "-e", "2", "--resume", str(src), exp="b") == 0
    assert load_checkpoint(tmp_path / "b" / "last_epoch_ckpt.pth.tar")["start_epoch"] == 2
    capsys.readouterr()
    assert run(tmp_path, "-b", "16", "-e", "2", "--resume", exp="nothing_here") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no checkpoint at" in err and "nothing_here" in err


def test_resume_refuses_another_architecture(tmp_path, capsys):
    assert run(tmp_path, "-b", "16", "-e", "1", exp="a") == 0
    capsys.readouterr()
    assert run(tmp_path, "-b", "16", "-e", "2", "--resume", options=["depth=3"], exp="a") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'depth': 2" in err and "'depth': 3" in err


def test_ckpt_initialises_weights_and_logs_summary(tmp_path):
    assert run(tmp_path, "-b", "16", "-e", "1", exp="src") == 0
    src = tmp_path / "src" / "last_epoch_ckpt.pth.tar"
    # Start a new run from those weights with lr 0: the weights must come out unchanged.
    assert run(tmp_path, "-b", "16", "-e", "1", "--ckpt", str(src), options=["lr=0", "weight_decay=0"], exp="dst") == 0
    a, b = load_checkpoint(src)["model"], load_checkpoint(tmp_path / "dst" / "last_epoch_ckpt.pth.tar")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = next((tmp_path / "dst").glob("train_log-*.txt")).read_text()
    assert "initial weights from" in log and "left at init 0" in log


def test_one_line_errors(tmp_path, capsys):
    cases = [
        (["--exp-options", "mask_ration=0.5"], "unknown option 'mask_ration'", "mask_ratio"),
        (["--exp-options", "max_epoch=ten"], "option 'max_epoch' expects int", "ten"),
        (["-d", "zero"], "bad -d/--devices value", "cpu:N"),
        (["-f", "no_such_recipe"], "unknown recipe", "mae_lite"),
    ]
    for extra, want1, want2 in cases:
        code = ssl_train(["-d", "cpu", "-f", "mae_lite_demo", "-e", "1", *extra] if "-f" not in extra
                         else ["-d", "cpu", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and want1 in err and want2 in err, err


def test_missing_imagenet_names_path_and_demo(tmp_path, capsys):
    code = ssl_train(["-d", "cpu", "-f", "mae_lite", "-b", "8", "-e", "1", "--exp-options",
                      f"output_dir={tmp_path}", f"data_root={tmp_path / 'nodata'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert str(tmp_path / "nodata" / "imagenet" / "imagenet_train") in err and "dataset=demo" in err


def test_show_config(capsys):
    assert ssl_train(["-f", "mae_lite_exp.py", "--show-config", "--exp-options", "mask_ratio=0.6"]) == 0
    out = capsys.readouterr().out
    assert "mae_vit_tiny_patch16" in out and "0.6" in out and "opt_betas" in out


class _NaNAfter(torch.nn.Module):
    """Wraps a method and returns a NaN loss from the given step on."""

    def __init__(self, inner, bad_step):
        super().__init__()
        self.model, self.inner, self.bad_step, self.calls = inner.model, inner, bad_step, 0

    def forward(self, images, target=None):
        loss, logs = self.inner(images, target)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.bad_step else loss), logs


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    class Recipe(MaeLiteDemo):
        def build_model(self):
            return _NaNAfter(super().build_model(), bad_step=4 + 2)  # 4 steps per epoch: dies in epoch 2

    recipe = Recipe(output_dir=str(tmp_path), exp_name="nan", batch_size=16, max_epoch=3, dump_interval=1,
                    depth=2, demo_samples=64, num_workers=0, vis_images=0)
    with pytest.raises(NonFiniteLoss) as info:
        train(recipe, DistEnv())
    msg = str(info.value)
    assert "\n" not in msg and "epoch 2" in msg and "is intact" in msg and "--resume" in msg
    ckpt = load_checkpoint(tmp_path / "nan" / "last_epoch_ckpt.pth.tar")
    assert ckpt["start_epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_two_process_gloo_ddp(tmp_path, launcher):
    args = ["-d", "cpu:2" if launcher == "spawn" else "cpu", "-f", "mae_lite_demo", "-b", "16", "-e", "2",
            "--exp-options", f"output_dir={tmp_path}", "exp_name=ddp", *TINY]
    if launcher == "spawn":
        cmd = [sys.executable, "-m", "mae_lite.cli.train", *args]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "mae_lite.cli.train", *args]
    proc = run_process(cmd)
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last_epoch_ckpt.pth.tar")
    assert ckpt["start_epoch"] == 2 and len(ckpt["rng"]) == 2
    assert all(k.startswith("model.") for k in ckpt["model"])  # never DDP's module. prefix
    # 64 images, 2 processes x 8 per step -> 4 steps per epoch, 8 in all
    assert ckpt["scheduler"]["last_count"] == 7
    assert "world size 2" in stdout + stderr


def test_amp_on_cpu_runs_in_bf16(tmp_path):
    assert run(tmp_path, "-b", "16", "-e", "1", "--amp", exp="amp") == 0
    log = next((tmp_path / "amp").glob("train_log-*.txt")).read_text()
    assert "bfloat16 autocast" in log
    ckpt = load_checkpoint(tmp_path / "amp" / "last_epoch_ckpt.pth.tar")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # master weights stay fp32


def test_gradient_clipping_is_applied(tmp_path):
    # Clipping the gradient norm to 0 zeroes every update (AdamW without weight decay): weights stay at init.
    recipe = MaeLiteDemo(output_dir=str(tmp_path), exp_name="clip", batch_size=16, max_epoch=1, depth=2,
                         demo_samples=32, num_workers=0, vis_images=0, clip_grad=0.0, weight_decay=0.0)
    torch.manual_seed(recipe.seed)
    init = {k: v.clone() for k, v in recipe.build_model().state_dict().items()}
    train(recipe, DistEnv())
    after = load_checkpoint(tmp_path / "clip" / "last_epoch_ckpt.pth.tar")["model"]
    assert all(torch.equal(init[k], after[k]) for k in init)
    recipe.update({"clip_grad": "1.0", "exp_name": "clip1"})
    train(recipe, DistEnv())
    after = load_checkpoint(tmp_path / "clip1" / "last_epoch_ckpt.pth.tar")["model"]
    assert not all(torch.equal(init[k], after[k]) for k in init)


class _SlowImages(torch.utils.data.Dataset):
    """The demo photos, each image 40 ms late: a loader that cannot keep up with the model."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        import time

        time.sleep(0.04)
        return self.inner[i]


class _SlowDemo(MaeLiteDemo):
    def build_datasets(self):
        ds = super().build_datasets()
        return {"train": _SlowImages(ds["train"]), "eval": None}


def test_a_slow_loader_is_reported_with_the_fix(tmp_path):
    recipe = _SlowDemo(output_dir=str(tmp_path), exp_name="slow", depth=2, demo_samples=32, num_workers=0,
                       batch_size=8, max_epoch=1, vis_images=0, print_interval=1)
    train(recipe, DistEnv())
    log = next((tmp_path / "slow").glob("train_log-*.txt")).read_text()
    line = next(line for line in log.splitlines() if "waiting for data" in line)
    share = float(line.split("spent ")[1].split("%")[0])
    assert share > 60 and "raise num_workers" in line and "epoch 1" in line


def test_slow_loader_notice_threshold(caplog):
    from mae_lite.engine import loop

    with caplog.at_level("INFO", logger=loop.LOGGER.name):
        loop._warn_slow_loader({"data": 0.2, "total": 1.0}, 3, 4)  # 20 %: fine
        assert "waiting for data" not in caplog.text
        loop._warn_slow_loader({"data": 0.5, "total": 1.0}, 3, 4)
    assert "epoch 3 spent 50% of its step time waiting for data (4 loader workers per process)" in caplog.text
