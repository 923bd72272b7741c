"""Compute accounting: FLOPs per image counted on the first step, images, device-hours, kept across --resume."""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from mae_lite.engine.checkpoint import load_checkpoint
from mae_lite.engine.compute import Compute, flop_counter
from mae_lite.engine.dist import DistEnv
from mae_lite.engine.loop import train
from mae_lite.methods import Classify
from mae_lite.recipes.base import Recipe

D, C = 3 * 8 * 8, 5  # a linear classifier on flattened 8x8 RGB images


class _Linear(Recipe):
    name: ClassVar[str] = "test_linear"
    batch_size: int = 4
    max_epoch: int = 2
    img_size: int = 8
    warmup_epochs: int = 0
    enable_tensorboard: bool = False
    num_workers: int = 0

    def build_model(self):
        return Classify(nn.Sequential(nn.Flatten(), nn.Linear(D, C)), nn.CrossEntropyLoss())

    def build_datasets(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, C, (12,), generator=g)
        return {"train": torch.utils.data.TensorDataset(x, y), "eval": None}


def test_flops_per_image_of_a_linear_classifier_by_hand(tmp_path):
    result = train(_Linear(output_dir=str(tmp_path), exp_name="lin"), DistEnv())
    # forward x W^T: 2 D C per image; backward: only dL/dW (the input needs no gradient): 2 D C per image
    assert result.compute["flops_per_image"] == 4 * D * C
    assert result.compute["images"] == 2 * 3 * 4  # 2 epochs x 3 steps x 4 images
    assert result.compute["total_flops"] == 4 * D * C * 24
    assert result.compute["device_hours"] == pytest.approx(result.compute["seconds"] / 3600)
    assert result.compute["seconds"] > 0 and result.compute["device"] == "cpu"
    ckpt = load_checkpoint(tmp_path / "lin" / "last_epoch_ckpt.pth.tar")
    assert ckpt["compute"] == result.compute
    log = next((tmp_path / "lin").glob("train_log-*.txt")).read_text()
    assert "compute: 3.84e-06 GFLOP per image (forward + backward), 24 images" in log


def test_resume_adds_to_the_checkpoint_numbers(tmp_path):
    first = train(_Linear(output_dir=str(tmp_path), exp_name="r", max_epoch=1), DistEnv())
    second = train(_Linear(output_dir=str(tmp_path), exp_name="r", max_epoch=2), DistEnv(), resume_requested=True)
    assert first.compute["images"] == 12 and second.compute["images"] == 24
    assert second.compute["seconds"] > first.compute["seconds"]
    assert second.compute["flops_per_image"] == first.compute["flops_per_image"]


def test_counter_counts_cpu_sdpa_like_explicit_attention():
    q, k, v = (torch.randn(2, 3, 10, 4) for _ in range(3))
    with flop_counter() as c1:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with flop_counter() as c2:
        (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v
    assert c1.get_total_flops() == c2.get_total_flops() == 2 * (2 * 2 * 3 * 10 * 10 * 4)


def test_compute_state_round_trip_and_summary():
    c = Compute(flops_per_image=2e9, device="cuda")
    c.add(images=1000, seconds=3600, world_size=8)
    assert c.device_hours == 8 and c.total_flops == 2e12
    again = Compute.from_state(c.state_dict())
    assert again == c
    assert c.summary() == "2 GFLOP per image (forward + backward), 1000 images, 0.002 PFLOP, 8 cuda-hours over 8 process(es)"
