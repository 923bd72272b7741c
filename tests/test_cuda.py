"""What only a GPU can show: a short bf16 MAE-Tiny run, fused AdamW, nccl. Skipped without CUDA (tests/conftest.py);
benchmarks/gpu_check.sh runs them with `pytest -m cuda`."""
from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist

from mae_lite.engine.checkpoint import load_checkpoint
from mae_lite.engine.dist import DistEnv, free_port, gather_failures, init_process, local_device_index, pg_timeout
from mae_lite.engine.loop import train
from mae_lite.errors import UserError
from mae_lite.recipes import MaeLiteDemo

pytestmark = pytest.mark.cuda


def test_two_mae_tiny_steps_at_224_px_on_cuda_with_bf16_give_a_finite_loss(tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    opts = dict(output_dir=str(tmp_path), exp_name="cuda", batch_size=8, max_epoch=1, demo_samples=16, img_size=224,
                patch_size=16, num_workers=0, vis_images=0, print_interval=1, enable_tensorboard=False)
    if "amp_dtype" in MaeLiteDemo().fields():
        opts["amp_dtype"] = "bf16"
    env = init_process(0, 1, local_device_index(0), "cuda")
    result = train(MaeLiteDemo(**opts), env, amp=True)
    assert result.epochs_done == 1 and math.isfinite(result.last_loss) and result.last_loss > 0
    ckpt = load_checkpoint(result.checkpoint)
    weights = ckpt["model"].values()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)  # master weights stay fp32
    assert ckpt["optimizer"]["state"], "the optimizer took no step"


def test_compile_true_compiles_with_inductor_on_cuda(tmp_path, monkeypatch):
    """compile=True on the GPU: inductor compiles the network although the first step counts FLOPs (torch < ~2.13
    left it eager for good: tests/test_loop.py has the CPU version)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    monkeypatch.setattr("mae_lite.engine.step.COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    opts = dict(output_dir=str(tmp_path), exp_name="cc", batch_size=8, max_epoch=1, demo_samples=32, img_size=32,
                patch_size=4, depth=2, num_workers=0, vis_images=0, print_interval=2, enable_tensorboard=False)
    env = init_process(0, 1, local_device_index(0), "cuda")
    result = train(MaeLiteDemo(**opts, compile=True), env, amp=True)
    assert counter.frame_count >= 1 and result.compiled_graphs >= 1
    assert math.isfinite(result.last_loss) and result.compute["flops_per_image"] > 0


def test_adamw_is_fused_on_cuda():
    recipe = MaeLiteDemo(img_size=32, patch_size=4, depth=2)
    net = recipe.build_model().to("cuda")
    opt = recipe.build_optimizer(net)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults.get("fused") is True


def test_nccl_process_group_and_the_rank_agreement_on_the_gpu(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=pg_timeout(), device_id=torch.device("cuda", 0))
    try:
        t = torch.arange(3.0, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [0.0, 1.0, 2.0]
        env = DistEnv(0, 1, 0, torch.device("cuda", 0))
        assert gather_failures(env, None) is None  # the flag all-reduced on the GPU, nothing gathered
        assert gather_failures(env, UserError("no data at /x")) == [("UserError", socket.gethostname(), "no data at /x")]
    finally:
        dist.destroy_process_group()
