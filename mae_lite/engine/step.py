"""One optimizer step (the hot path) and what it runs under: precision, compilation, the EMA, the timer.

Nothing here waits for the device: the step returns its loss as a device tensor, and the loop reads the losses
(and the stop flags) every few steps in one all-reduce (`loop._sync_step`).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from .log import LOGGER

COMPILE_BACKEND = "inductor"


@dataclass
class Precision:
    dtype: Optional[torch.dtype]  # the autocast dtype, None: float32
    scaler: torch.amp.GradScaler  # enabled for float16 only

    def autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]


def autocast_dtype(device: torch.device, amp_dtype: Optional[str] = None) -> torch.dtype:
    """The --amp dtype: `amp_dtype` ("bf16" / "fp16") when given, else bfloat16 where the device has it (CPUs,
    Ampere and later GPUs) and float16 elsewhere. Training and evaluation both ask here."""
    if amp_dtype is None:
        amp_dtype = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    return torch.bfloat16 if amp_dtype == "bf16" else torch.float16


def choose_precision(amp: bool, amp_dtype: Optional[str], device: torch.device) -> Precision:
    """--amp: bfloat16 autocast without GradScaler where the device has bfloat16 (CPUs, Ampere and later GPUs),
    else float16 with GradScaler; `amp_dtype` ("bf16" / "fp16") overrides the choice."""
    if not amp:
        if amp_dtype:
            LOGGER.info("notice: amp_dtype=%s has no effect without --amp", amp_dtype)
        return Precision(None, torch.amp.GradScaler(device.type, enabled=False))
    dtype = autocast_dtype(device, amp_dtype)
    if device.type == "cpu" and dtype is torch.bfloat16:
        LOGGER.info("--amp on CPU: bfloat16 autocast (no GradScaler); without AMX it is slower than fp32")
    return Precision(dtype, torch.amp.GradScaler(device.type, enabled=dtype is torch.float16))


@contextlib.contextmanager
def global_settings(recipe, env, amp: bool):
    """Process-wide switches for this run, put back afterwards: TF32 matmuls for float32 runs on CUDA, and
    `deterministic` (torch.use_deterministic_algorithms; on CUDA also cuBLAS's fixed workspace, no cuDNN
    autotuning)."""
    before = (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
              torch.backends.cudnn.benchmark)
    try:
        if env.device.type == "cuda" and not amp:
            torch.set_float32_matmul_precision("high")
        if recipe.deterministic:
            if env.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.use_deterministic_algorithms(before[1])
        torch.backends.cudnn.benchmark = before[2]


def compile_network(method: nn.Module) -> None:
    """torch.compile the method's network in place (`nn.Module.compile`): the module keeps its parameters and
    state-dict keys (no `_orig_mod.`), so checkpoints are the same with and without compile=True."""
    method.model.compile(backend=COMPILE_BACKEND)


def eager_keys(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict written by a torch.compile'd wrapper (keys with `_orig_mod.`) in the eager layout."""
    if not any("_orig_mod." in k for k in state):
        return state
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def make_ema(recipe, method: nn.Module):
    """timm's ModelEmaV3 of the whole method (the same state-dict layout as `model` in checkpoints)."""
    if not recipe.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(method, decay=recipe.model_ema_decay)


class StepTimer:
    """Seconds of a window of steps: CUDA events on CUDA (read after the window's sync, so no extra wait),
    perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e0.record()

    def stop(self) -> None:
        """Mark the window's end (before the sync that drains the device)."""
        if self.cuda:
            self.e1 = torch.cuda.Event(enable_timing=True)
            self.e1.record()

    def seconds(self) -> float:
        """The window's seconds; call after the sync."""
        if self.cuda:
            return self.e0.elapsed_time(self.e1) / 1000.0
        return time.perf_counter() - self.t0


@dataclass
class Stepper:
    """What one optimizer step needs."""
    recipe: Any
    model: nn.Module  # the method, DDP-wrapped over several processes
    method: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    precision: Precision
    ema: Any
    device: torch.device
    total_steps: int

    def step(self, micro_batches: list, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """One optimizer step over `micro_batches` (accum_iter of them): the mean loss as a device tensor and the
        last micro-batch's logs. DDP all-reduces the gradients on the last micro-batch only."""
        self.schedule.step(step)
        if hasattr(self.method, "set_progress"):  # methods with per-step schedules of their own (MoCo momentum)
            self.method.set_progress(step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        n, scaler, total, logs = len(micro_batches), self.precision.scaler, None, {}
        for i, batch in enumerate(micro_batches):
            images, target = self.recipe.device_batch(batch, self.device)
            with self._no_sync(last=i == n - 1), self.precision.autocast(self.device.type):
                loss, logs = self.model(images, target)
            scaler.scale(loss / n if n > 1 else loss).backward()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        self._clip(scaler)
        scaler.step(self.optimizer)  # no host sync: disabled (bf16 / fp32), or a fused optimizer takes found_inf
        scaler.update()
        if self.ema is not None:
            self.ema.update(self.method)
        return (total / n if n > 1 else total), logs

    def _no_sync(self, last: bool):
        if not last and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _clip(self, scaler) -> None:
        clip = self.recipe.clip_grad
        if clip is None:
            return
        scaler.unscale_(self.optimizer)
        if self.recipe.clip_mode == "value":
            torch.nn.utils.clip_grad_value_(self.model.parameters(), clip)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)


def check_accum(batch_size: int, world: int, accum: int) -> int:
    """The micro-batch per process: -b / (processes x accum_iter), refused when it does not divide."""
    if batch_size % (world * accum):
        times = f" x accum_iter {accum}" if accum > 1 else ""
        raise UserError(f"-b {batch_size} is not divisible by the {world} processes{times}; use a multiple of "
                        f"{world * accum}")
    return batch_size // (world * accum)
