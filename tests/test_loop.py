"""The training loop at scale: no host syncs inside a step, gradient accumulation, model EMA, precision choice,
torch.compile, the resumable per-epoch seeded loader, deterministic mode (docs/training.md)."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler, TensorDataset

import pytest

from mae_lite.engine import loop
from mae_lite.engine.checkpoint import load_checkpoint
from mae_lite.engine.dist import DistEnv
from mae_lite.engine.loader import EpochSampler, TrainLoader
from mae_lite.engine.loop import train
from mae_lite.engine.evaluate import evaluate
from mae_lite.engine.step import autocast_dtype, check_accum, choose_precision, compile_network, global_settings
from mae_lite.errors import Stopped, UserError
from mae_lite.recipes import Finetune, MaeLiteDemo

TINY = dict(depth=2, demo_samples=32, batch_size=8, max_epoch=1, num_workers=0, vis_images=0,
            enable_tensorboard=False)


# ----- host syncs ------------------------------------------------------------------------------------------
class _Syncs:
    """Counts the calls that make the host wait for the device (on a GPU), except those on the optimizer's step
    counters (torch keeps them on the host on a GPU too, so they are no device sync)."""

    def __init__(self, monkeypatch):
        self.n, self.host_scalars = 0, lambda t: False
        for name in ("item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(torch.cuda.synchronize, tensor=False))
        real_tensor = torch.tensor

        def tensor(*args, **kwargs):  # torch.tensor(..., device=): a pageable copy to the device ("cpu": a host
            self.n += kwargs.get("device") not in (None, "cpu")  # tensor by intent, as torch's optimizers make)
            return real_tensor(*args, **kwargs)

        monkeypatch.setattr(torch, "tensor", tensor)

    def _wrap(self, fn, tensor=True):
        def counted(*args, **kwargs):
            if not (tensor and self.host_scalars(args[0])):
                self.n += 1
            return fn(*args, **kwargs)

        return counted


class _Marked(MaeLiteDemo):
    """Fixed images (no loader-side tensor reads), the syncs counted at every forward."""
    syncs = None

    def build_datasets(self):
        images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return {"train": TensorDataset(images, torch.zeros(32, dtype=torch.long)), "eval": None}

    def build_model(self):
        method = super().build_model()
        method.marks = []
        method.register_forward_pre_hook(lambda m, args: m.marks.append(type(self).syncs.n))
        type(self).method = method
        return method

    def build_optimizer(self, model):
        opt = super().build_optimizer(model)
        type(self).syncs.host_scalars = lambda t: any(t is s.get("step") for s in opt.state.values())
        return opt


@pytest.mark.parametrize("check_seconds", [1e9, 0.0])
def test_no_host_sync_inside_a_step_between_print_intervals(tmp_path, monkeypatch, check_seconds):
    """8 steps, print_interval 2: steps 1, 3, 5, 7 read nothing back; 2, 4, 6, 8 do (one read of the losses and
    flags). With slow steps (STOP_CHECK_SECONDS 0) the flags are read after every step once the ranks agreed on
    the step time."""
    monkeypatch.setattr(loop, "STOP_CHECK_SECONDS", check_seconds)
    _Marked.syncs = _Syncs(monkeypatch)
    train(_Marked(**{**TINY, "max_epoch": 2}, output_dir=str(tmp_path), print_interval=2), DistEnv())
    marks = _Marked.method.marks + [None]
    assert len(marks) == 9
    per_step = [marks[k + 1] - marks[k] for k in range(7)]  # syncs from forward k to forward k + 1
    if check_seconds:
        assert [n for k, n in enumerate(per_step) if k % 2 == 0] == [0, 0, 0, 0], per_step
        assert all(n > 0 for k, n in enumerate(per_step) if k % 2 == 1), per_step
    else:
        # step 2 reads the first window's time, step 4 agrees on it: from step 5 on every step reads the flags
        assert per_step[0] == per_step[2] == 0 and all(n > 0 for n in per_step[3:]), per_step


# ----- gradient accumulation ---------------------------------------------------------------------------------
def test_accum_iter_4_gives_the_weights_of_one_batch_of_4x(tmp_path):
    """MAE's masks and the crops do not depend on how a batch is split (per-image seeds, one noise stream), so
    4 micro-batches of 2 per step train the same weights as batches of 8."""
    for accum in (1, 4):
        train(MaeLiteDemo(**TINY, output_dir=str(tmp_path), exp_name=f"a{accum}", accum_iter=accum), DistEnv())
    one, four = (load_checkpoint(tmp_path / f"a{a}" / "last_epoch_ckpt.pth.tar") for a in (1, 4))
    for k, v in one["model"].items():
        torch.testing.assert_close(four["model"][k], v, rtol=1e-4, atol=2e-5, msg=k)
    assert {float(s["step"]) for s in four["optimizer"]["state"].values()} == {4.0}  # 32 images / 8 per step
    assert four["iters_per_epoch"] == 4 and four["config"]["accum_iter"] == 4


def test_sigterm_mid_epoch_with_accum_iter_resumes_bit_for_bit(tmp_path):
    """The checkpoint counts optimizer steps; --resume starts the sampler after their micro-batches."""
    from test_preemption import _PreemptedDemo

    opts = dict(TINY, output_dir=str(tmp_path), accum_iter=2, print_interval=1)
    train(MaeLiteDemo(**opts, exp_name="straight"), DistEnv())
    with pytest.raises(Stopped):  # image 12 is in micro-batch 3 (images 9-12): optimizer step 2 of 4
        train(_PreemptedDemo(**opts, exp_name="cut", at=12), DistEnv())
    cut = load_checkpoint(tmp_path / "cut" / "last_epoch_ckpt.pth.tar")
    assert (cut["start_epoch"], cut["iteration"], cut["iters_per_epoch"]) == (0, 2, 4)
    assert {float(s["step"]) for s in cut["optimizer"]["state"].values()} == {2.0}
    train(MaeLiteDemo(**opts, exp_name="cut"), DistEnv(), resume_requested=True)
    a, b = (load_checkpoint(tmp_path / n / "last_epoch_ckpt.pth.tar")["model"] for n in ("straight", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_accumulate_with_no_sync(tmp_path):
    """-b 16 over 2 processes x accum_iter 2: micro-batches of 4, DDP's all-reduce on every second one only."""
    import sys

    from _proc import run_process

    proc = run_process([sys.executable, "-m", "mae_lite.cli.train", "-d", "cpu:2", "-f", "mae_lite_demo", "-b", "16",
                        "-e", "1", "--exp-options", f"output_dir={tmp_path}", "exp_name=ddp", "depth=2",
                        "demo_samples=32", "num_workers=0", "vis_images=0", "accum_iter=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last_epoch_ckpt.pth.tar")
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2.0}  # 32 images / 16 per step
    assert "in 2 micro-batches of 4" in proc.stdout + proc.stderr


def test_accum_iter_refuses_batches_that_do_not_split():
    assert check_accum(4096, 2, 4) == 512  # the seed's 4096 on 2 GPUs: 4 micro-batches of 512 per process
    with pytest.raises(UserError, match="not divisible by the 2 processes x accum_iter 3; use a multiple of 6"):
        check_accum(8, 2, 3)
    with pytest.raises(UserError, match="accum_iter"):
        MaeLiteDemo(accum_iter=0)


# ----- model EMA --------------------------------------------------------------------------------------------
def test_model_ema_is_updated_each_step_evaluated_saved_and_resumed(tmp_path):
    """1 step per epoch, decay 0.5: after epoch 2, EMA = 0.5 x (epoch 1's EMA) + 0.5 x (the model)."""
    opts = dict(dataset="demo", img_size=32, patch_size=4, depth=2, num_classes=13, demo_samples=16, num_workers=0,
                batch_size=16, eval_interval=1, output_dir=str(tmp_path), pretrain_exp_name="scratch/ema",
                model_ema=True, model_ema_decay=0.5, enable_tensorboard=False, dump_interval=1)
    train(Finetune(**opts, max_epoch=1), DistEnv())
    ckpt_file = tmp_path / "scratch/ema/ft_eval/last_epoch_ckpt.pth.tar"
    first = load_checkpoint(ckpt_file)
    assert first["model_ema"].keys() == first["model"].keys()
    result = train(Finetune(**opts, max_epoch=2), DistEnv(), resume_requested=True)
    second = load_checkpoint(ckpt_file)
    for k, v in second["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(second["model_ema"][k], 0.5 * first["model_ema"][k] + 0.5 * v, msg=k)
    assert "top1" in result.metrics_ema and isinstance(second["best_from_ema"], bool)
    best = max(result.metrics["top1"], result.metrics_ema["top1"])
    assert second["best_top1"] >= best - 1e-9
    log = "".join(p.read_text() for p in (tmp_path / "scratch/ema/ft_eval").glob("train_log-*.txt"))
    assert "| EMA Top1:" in log


# ----- precision, deterministic mode ----------------------------------------------------------------------------
def test_amp_picks_bf16_without_scaler_and_amp_dtype_overrides(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_precision(False, None, cpu).dtype is None
    auto = choose_precision(True, None, cpu)
    assert auto.dtype is torch.bfloat16 and not auto.scaler.is_enabled()
    fp16 = choose_precision(True, "fp16", cpu)
    assert fp16.dtype is torch.float16 and fp16.scaler.is_enabled()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a pre-Ampere GPU
    with warnings.catch_warnings():  # GradScaler("cuda") without CUDA: disabled, with a warning
        warnings.simplefilter("ignore")
        assert choose_precision(True, None, torch.device("cuda")).dtype is torch.float16
    with pytest.raises(UserError, match="amp_dtype"):
        MaeLiteDemo(amp_dtype="fp8")


def test_evaluation_autocasts_in_the_training_runs_dtype(monkeypatch):
    """evaluate() under --amp uses the dtype the run trains in (amp_dtype, else the device's best), not a fixed one."""
    seen = []
    net = torch.nn.Linear(4, 3)
    net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loader = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    for amp_dtype, want in [(None, torch.bfloat16), ("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        evaluate(net, loader, DistEnv(), amp=True, amp_dtype=amp_dtype)
        assert seen[-1] is want, (amp_dtype, seen[-1])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a pre-Ampere GPU
    assert autocast_dtype(torch.device("cuda")) is torch.float16 and autocast_dtype(torch.device("cpu")) is torch.bfloat16


def test_deterministic_mode_is_on_during_the_run_only():
    before = torch.are_deterministic_algorithms_enabled()
    with global_settings(MaeLiteDemo(deterministic=True), DistEnv(), amp=False):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


# ----- torch.compile ------------------------------------------------------------------------------------------
def test_compiled_network_gives_eager_loss_and_gradients():
    class Method(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))

    torch.manual_seed(0)
    method, x = Method(), torch.randn(4, 8)
    eager = method.model(x).square().mean()
    eager.backward()
    grads = [p.grad.clone() for p in method.parameters()]
    method.zero_grad()
    keys = list(method.state_dict())
    compile_network(method)
    try:
        compiled = method.model(x).square().mean()
    except Exception as e:  # no working C++ toolchain for inductor's CPU kernels
        if "compil" in str(e).lower() and ("c++" in str(e).lower() or "cpp" in str(e).lower()):
            pytest.skip(f"inductor cannot build CPU kernels here: {str(e).splitlines()[0][:120]}")
        raise
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(method.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    assert list(method.state_dict()) == keys  # no `_orig_mod.`


def test_compiled_run_checkpoints_resume_eagerly(tmp_path, monkeypatch):
    """compile=True keeps the checkpoint's keys; an eager --resume continues it (dynamo's eager backend here:
    what is tested is the wrapping, not inductor's kernels)."""
    monkeypatch.setattr("mae_lite.engine.step.COMPILE_BACKEND", "eager")
    opts = dict(TINY, output_dir=str(tmp_path), exp_name="c", batch_size=16)
    train(MaeLiteDemo(**opts, compile=True), DistEnv())
    ckpt = load_checkpoint(tmp_path / "c" / "last_epoch_ckpt.pth.tar")
    assert list(ckpt["model"]) == list(MaeLiteDemo(**opts).build_model().state_dict())
    assert train(MaeLiteDemo(**{**opts, "max_epoch": 2}), DistEnv(), resume_requested=True).epochs_done == 2


def test_compile_true_compiles_although_the_first_step_counts_flops(tmp_path, monkeypatch):
    """The first step runs under FlopCounterMode; torch < ~2.13 marked a frame first met under it skipped for
    good, so a compiled network silently ran eagerly. A counting backend must see the network compiled, and the
    run must report the count (and the FLOPs still counted)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    monkeypatch.setattr("mae_lite.engine.step.COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    opts = dict(TINY, output_dir=str(tmp_path), exp_name="cc", batch_size=8, print_interval=2)
    result = train(MaeLiteDemo(**opts, compile=True), DistEnv())
    assert counter.frame_count >= 1 and result.compiled_graphs >= 1
    assert result.compute["flops_per_image"] > 0
    log = next((tmp_path / "cc").glob("train_log-*.txt")).read_text()
    assert f"torch.compile compiled {result.compiled_graphs} graph(s)" in log


# ----- the loader ---------------------------------------------------------------------------------------------
def test_epoch_sampler_splits_like_distributed_sampler():
    for epoch in (0, 3):
        for rank in (0, 1):
            ours = EpochSampler(11, DistEnv(rank=rank, world_size=2), shuffle=True, seed=7)
            ours.epoch = epoch
            ref = DistributedSampler(range(11), 2, rank, shuffle=True, seed=7, drop_last=True)
            ref.set_epoch(epoch)
            assert [i for i, _ in ours] == list(ref)


class _RandomItems(torch.utils.data.Dataset):
    """Item i: (a random augmentation of i, i), counting the loads."""

    def __init__(self):
        self.loads = 0

    def __len__(self):
        return 24

    def __getitem__(self, i):
        self.loads += 1
        return torch.rand(2) + i, i


def test_mid_epoch_start_skips_without_loading_and_workers_do_not_change_the_data():
    ds = _RandomItems()
    loader = TrainLoader(ds, 4, DistEnv(), workers=0, train=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([b for b in loader])
    assert torch.equal(torch.get_rng_state(), state)  # loading never draws from the training's stream
    assert len(loader) == 6 and [len(e) for e in epochs] == [6, 6]
    assert not torch.equal(epochs[0][0][1], epochs[1][0][1])  # a new order every epoch
    seeds = loader.sampler.item_seed
    loader.set_epoch(1)
    loader.sampler.item_seed = seeds  # as a resumed run draws it from the restored stream
    loader.set_start(4)
    ds.loads = 0
    tail = list(loader)
    assert ds.loads == 8 and len(tail) == 2
    for (x, y), (rx, ry) in zip(tail, epochs[1][4:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    pooled = TrainLoader(_RandomItems(), 4, DistEnv(), workers=2, train=True)  # persistent workers
    for epoch in range(2):
        loader.set_epoch(epoch)
        pooled.set_epoch(epoch)
        pooled.sampler.item_seed = loader.sampler.item_seed
        for (x, y), (rx, ry) in zip(list(pooled), list(loader), strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as info:
        train(MaeLiteDemo(**TINY, output_dir=str(tmp_path / "file")), DistEnv())
    assert "\n" not in str(info.value) and str(tmp_path / "file") in str(info.value)
