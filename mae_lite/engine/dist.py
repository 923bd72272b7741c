"""Processes and devices: `-d` parsing, torchrun detection, process groups, cross-rank reductions."""
from __future__ import annotations

import datetime
import os
import re
import signal
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

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


def launched_by_srun() -> bool:
    """One task of an `srun` step of several tasks, started without torchrun. SLURM_STEP_NUM_TASKS is set by srun
    only: the batch script itself has SLURM_PROCID=0 and SLURM_NTASKS too, but runs one process."""
    try:
        tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        return False
    return "RANK" not in os.environ and "SLURM_PROCID" in os.environ and tasks > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: `gpu[07-09,12],cpu01` -> `gpu07`."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())


def _tasks_on_this_node(env: dict) -> int:
    """SLURM_STEP_TASKS_PER_NODE (`4(x2),3`) at this node's index; the largest count if the index is unknown."""
    counts: list[int] = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")).split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "-1"))
    return counts[node] if 0 <= node < len(counts) else max(counts, default=1)


def adopt_srun_env() -> bool:
    """Under `srun` without torchrun, write torchrun's variables from SLURM's, so that the tasks of the step form one
    world (rank SLURM_PROCID of SLURM_STEP_NUM_TASKS, local rank SLURM_LOCALID) instead of each spawning its own.
    MASTER_ADDR/MASTER_PORT are kept if set, else the step's first host and a port derived from the job id
    (docs/cluster.md). Returns whether this process is such a task."""
    if not launched_by_srun():
        return False
    env = os.environ
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = str(_tasks_on_this_node(env))
    if not env.get("MASTER_ADDR"):
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise UserError("srun task without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: set MASTER_ADDR to the host "
                            "of task 0, or start ssl_train under torchrun (docs/cluster.md)")
        env["MASTER_ADDR"] = first_host(nodes)
    if not env.get("MASTER_PORT"):
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    return True


def external_launcher() -> Optional[str]:
    """"torchrun" or "srun" when another program started this process as one rank of a world, else None."""
    if launched_by_torchrun():
        return "torchrun"
    return "srun" if adopt_srun_env() else None


def local_world_size(env: "DistEnv") -> int:
    """Processes sharing this machine (torchrun's LOCAL_WORLD_SIZE; all of them for a single-node spawn)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
    except ValueError:
        return env.world_size


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_workers(requested: int, env: "DistEnv") -> int:
    """Loader workers per process: `num_workers`, capped by this machine's cores shared by its local processes."""
    return min(requested, cpu_cores() // local_world_size(env))


def local_device_index(local_rank: int) -> int:
    """The GPU of a rank on its node: the local rank when this process sees every GPU of the node, GPU 0 when the
    launcher gave each process its own (`srun --gpus-per-task=1`, one CUDA_VISIBLE_DEVICES per process)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise UserError(f"local rank {local_rank} but only {count} GPUs are visible on {socket.gethostname()}: start one "
                    "process per GPU (torchrun --nproc_per_node, srun --ntasks-per-node)")


# Signals that ask a training run to save and stop. torchrun forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT (its
# TORCHELASTIC_SIGNALS_TO_HANDLE / --signals-to-handle default) to the workers as they are; SIGUSR1 is what many
# SLURM scripts ask for (`--signal=USR1@120`). Any of them must end in a checkpoint, not in a dead worker.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP", "SIGQUIT")
                     if hasattr(signal, n))


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
    started under torchrun (or an srun step of several tasks), else one process on the first device of `devices` (the CPU if CUDA is absent)."""
    if external_launcher():
        kind = "cuda" if torch.cuda.is_available() and not devices.lower().startswith("cpu") else "cpu"
        local = int(os.environ["LOCAL_RANK"])
        return init_process(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                            local_device_index(local) if kind == "cuda" else local, kind)
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
        reports = gather_failures(env, own)
    except Exception as e:  # the agreement itself broke (a rank died): keep this rank's own error first
        if own is not None:
            raise own from e
        raise UserError(f"{what}: the other ranks did not answer ({type(e).__name__}); see their output") from e
    if reports is None:
        return
    if own is not None and not isinstance(own, UserError):
        raise own
    raise _agreed_error(reports)


def gather_failures(env: DistEnv, own: Optional[BaseException]) -> Optional[list]:
    """None when no rank failed (one all-reduce of a flag on the device), else every rank's report (None or
    (error class, host, message)), the same list on every rank."""
    flag = torch.tensor([0 if own is None else 1], device=env.device)
    dist.all_reduce(flag)
    if not int(flag.item()):
        return None
    reports: list = [None] * env.world_size
    dist.all_gather_object(reports, None if own is None else _report(own))
    return reports


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
    err = cls("; ".join(parts))
    err.agreed = True  # every rank raises this same error: one of them (rank 0) is enough to print it
    return err


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        t = t.clone()
        dist.all_reduce(t)
        t /= env.world_size
    return t


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank (what rank 0 read from its disk, decided, or computed alone)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
