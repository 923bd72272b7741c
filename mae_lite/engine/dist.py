"""Processes and devices: `-d` parsing, torchrun detection, process groups, cross-rank reductions."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class DeviceSpec:
    kind: str  # "cuda" or "cpu"
    ids: tuple[int, ...]  # GPU ids (cuda) or one entry per CPU process

    @property
    def nprocs(self) -> int:
        return len(self.ids)


def parse_devices(spec: str) -> DeviceSpec:
    """`0-7` (a range), `0,1` (a list), `3`, `cpu` (one CPU process) or `cpu:N` (N CPU processes, gloo)."""
    s = spec.strip().lower()
    try:
        if s == "cpu":
            return DeviceSpec("cpu", (0,))
        if s.startswith("cpu:"):
            n = int(s[4:])
            if n < 1:
                raise ValueError
            return DeviceSpec("cpu", tuple(range(n)))
        ids: list[int] = []
        for part in s.split(","):
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if b < a:
                    raise ValueError
                ids.extend(range(a, b + 1))
            else:
                ids.append(int(part))
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
            raise ValueError
        return DeviceSpec("cuda", tuple(ids))
    except ValueError:
        raise UserError(f"bad -d/--devices value {spec!r}: use a GPU range like 0-7, a list like 0,1, cpu, or cpu:N") from None


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process(rank: int, world_size: int, device_index: int, kind: str) -> DistEnv:
    """Join the process group (nccl on CUDA, gloo on CPU) and pick this process's device."""
    if kind == "cuda":
        torch.cuda.set_device(device_index)
        device = torch.device("cuda", device_index)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, device_index, device)


def init_from_cli(devices: str) -> DistEnv:
    """The process of a command that does not spawn (ssl_eval, ssl_sweep): a rank of torchrun's group when
    started under torchrun, else one process on the first device of `devices` (the CPU if CUDA is absent)."""
    if launched_by_torchrun():
        kind = "cuda" if torch.cuda.is_available() and not devices.lower().startswith("cpu") else "cpu"
        return init_process(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), kind)
    spec = parse_devices(devices)
    kind = spec.kind if spec.kind == "cpu" or torch.cuda.is_available() else "cpu"
    return init_process(0, 1, spec.ids[0] if kind == "cuda" else 0, kind)


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        t = t.clone()
        dist.all_reduce(t)
        t /= env.world_size
    return t


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
