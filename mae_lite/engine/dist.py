"""Processes and devices: `-d` parsing, torchrun detection, process groups, cross-rank reductions."""
from __future__ import annotations

import datetime
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .. import errors
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


TIMEOUT_ENV = "MAE_LITE_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 30 minutes)


def pg_timeout() -> datetime.timedelta:
    """The process group's timeout: long enough for a slow checkpoint write or evaluation on one rank, short
    enough that a rank lost without a message does not hold a cluster job for torch's default hours."""
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
        if seconds <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds (e.g. 1800)") from None
    return datetime.timedelta(seconds=seconds)


def init_process(rank: int, world_size: int, device_index: int, kind: str) -> DistEnv:
    """Join the process group (nccl on CUDA, gloo on CPU) and pick this process's device."""
    if kind == "cuda":
        torch.cuda.set_device(device_index)
        device = torch.device("cuda", device_index)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=pg_timeout())
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


@contextmanager
def rank_agreement(env: DistEnv, what: str) -> Iterator[None]:
    """Run the block on every rank, then agree (one all-reduced flag) on whether it failed anywhere.

    An input error seen by some ranks only (a file missing on one node) would otherwise leave the others waiting
    in their next collective until the timeout, with no message. If any rank failed, every rank raises one
    UserError naming each failing rank, its host and its message; a rank whose own error was not a UserError
    (a bug) re-raises that after taking part, so its traceback is kept. One process: a plain pass-through.
    """
    if not env.distributed:
        yield
        return
    own: BaseException | None = None
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        own = e
    try:
        flag = torch.tensor([0 if own is None else 1], device=env.device)
        dist.all_reduce(flag)
        failed = int(flag.item())
        if failed:
            reports: list = [None] * env.world_size
            dist.all_gather_object(reports, None if own is None else _report(own))
    except Exception as e:  # the agreement itself broke (a rank died): keep this rank's own error first
        if own is not None:
            raise own from e
        raise UserError(f"{what}: the other ranks did not answer ({type(e).__name__}); see their output") from e
    if not failed:
        return
    if own is not None and not isinstance(own, UserError):
        raise own
    raise _agreed_error(reports)


def _report(e: BaseException) -> tuple[str, str, str]:
    """(error class, host, message) of a failed rank; a bug reports its type and first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, UserError):
        return type(e).__name__, socket.gethostname(), text
    return "UserError", socket.gethostname(), f"{type(e).__name__}: {text}" if text else type(e).__name__


def _agreed_error(reports: list) -> UserError:
    """One error for every rank: failures with the same message are listed once, with their ranks and hosts."""
    by_message: dict[str, list[str]] = {}
    classes = set()
    for rank, report in enumerate(reports):
        if report is not None:
            cls, host, message = report
            classes.add(cls)
            by_message.setdefault(message, []).append(f"rank {rank} on host {host}")
    parts = []
    for message, where in by_message.items():
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more ranks" if len(where) > 4 else "")
        parts.append(f"{shown}: {message}")
    # keep the kind (a Stopped run exits 3, a diverged one 1) when every failing rank agrees on it
    cls = getattr(errors, classes.pop()) if len(classes) == 1 else UserError
    return cls("; ".join(parts))


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
