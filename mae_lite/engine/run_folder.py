"""One run per output folder, and no run lost to a slip: the folder's lock, the refusal to start a fresh run over a
checkpoint (or moving it aside on `--overwrite`), and `--resume` of a run that has nothing left to do.

Only rank 0 touches the folder (it alone writes checkpoints); the loop makes the other ranks follow its verdict
through `rank_agreement`. docs/cluster.md: "One run per output folder".
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from .checkpoint import load_checkpoint

LOCK_NAME = "run.lock"
LOCK_BEAT_S = 60.0  # the holder refreshes the lock's time this often (a thread: also during evaluation and saving)
LOCK_STALE_S = 600.0  # a lock of another host not refreshed this long belongs to a run that is gone (node failure)
MOVED_PREFIX = "overwritten-"
_STAMP = "%Y-%m-%d-%H-%M-%S"


# ----- the lock --------------------------------------------------------------------------------------------
def _start_ticks(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), so a pid reused by another process is told apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _attempt() -> dict[str, Any]:
    """This process's scheduler job and restart counts: a requeued SLURM job keeps its id and counts up
    SLURM_RESTART_COUNT; torchrun counts its restarts of the workers in TORCHELASTIC_RESTART_COUNT."""
    env = os.environ
    counts = [int(v) if v.isdigit() else 0
              for v in (env.get("SLURM_RESTART_COUNT", "0"), env.get("TORCHELASTIC_RESTART_COUNT", "0"))]
    return {"job": env.get("SLURM_JOB_ID"), "restarts": counts}


def _earlier_attempt(holder: dict[str, Any]) -> bool:
    """The holder is an earlier attempt of this very job (requeued after a node failure, restarted by torchrun):
    the scheduler ended it before starting this one, wherever it ran."""
    now = _attempt()
    before = holder.get("restarts") or [0, 0]
    return bool(now["job"]) and holder.get("job") == now["job"] and list(before) < now["restarts"]


def _pid_alive(pid: int, ticks: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OSError, OverflowError):
        return False
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


class RunLock:
    """`<folder>/run.lock`, created with O_CREAT | O_EXCL (atomic, NFS included) and holding host, pid, start time,
    command and SLURM job; refreshed every LOCK_BEAT_S by a daemon thread; removed by `release()`. `notice` says when
    a stale lock was taken over: a dead pid on this host, an earlier attempt of this SLURM job (requeued, or
    restarted by torchrun), or a lock of any host not refreshed for LOCK_STALE_S."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.notice: Optional[str] = None
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "ticks": _start_ticks(os.getpid()),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500],
                       **_attempt()}
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def acquire(self) -> "RunLock":
        for _ in range(3):  # a takeover raced by another process: look again
            if self._create():
                self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
                self._beat.start()
                return self
            text = self._read()
            why = _stale(text, self.path)
            if why is None:
                raise UserError(_held_message(self.path, text))
            if self._remove_stale(text):
                self.notice = f"notice: took over the lock {self.path} of a run that is gone ({why})"
        raise UserError(f"{self.path} keeps changing: another run is starting in {self.path.parent}; "
                        "use another exp_name, or wait for it")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise UserError(f"cannot create the lock file {self.path} ({e.strerror or e}); set output_dir= to a "
                            "writable folder") from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
        except OSError as e:
            self.path.unlink(missing_ok=True)
            raise UserError(f"cannot write the lock file {self.path} ({e.strerror or e}); free space, or set "
                            "output_dir= to a writable folder") from None
        return True

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except OSError:
            return ""

    def _remove_stale(self, seen: str) -> bool:
        """Remove the lock judged stale, unless another process replaced it in the meantime (then put it back)."""
        aside = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        ours = aside.read_text() == seen
        if not ours:  # a fresh lock of a racing process: it stays
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)
        return ours

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_BEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # gone or unwritable: the run goes on; only a later run's verdict is affected
                pass

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():  # ours, not a successor's
                self.path.unlink()
        except (OSError, ValueError, AttributeError):
            pass


def _holder(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def _stale(text: str, path: Path) -> Optional[str]:
    """Why the lock with content `text` belongs to a run that is gone; None while its holder may be alive."""
    holder = _holder(text)
    pid, host = holder.get("pid"), holder.get("host")
    who = f"pid {pid} on host {host}, since {holder.get('since')}"
    if host == socket.gethostname() and isinstance(pid, int):  # this host can tell for sure
        return None if _pid_alive(pid, holder.get("ticks")) else who + ", no longer running"
    if _earlier_attempt(holder):
        return f"{who}, an earlier attempt of SLURM job {holder['job']}"
    try:
        idle = time.time() - path.stat().st_mtime
    except OSError:
        return "removed meanwhile"
    if idle > LOCK_STALE_S:
        return f"{who if holder else 'an unreadable lock'}, not refreshed for {idle / 60:.0f} minutes"
    return None


def _held_message(path: Path, text: str) -> str:
    holder = _holder(text)
    if not holder:
        return (f"{path.parent} is in use by another run (its lock {path} is unreadable or being written); wait a "
                "minute and try again, or use another exp_name")
    command = f" ({holder['command'][:120]})" if holder.get("command") else ""
    who = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}{command}"
    if holder.get("host") == socket.gethostname():
        return (f"{path.parent} is in use by another run: {who}; wait for it to end (its lock {path} goes with it) "
                "or use another exp_name")
    try:
        beat = f", alive {time.time() - path.stat().st_mtime:.0f} s ago"
    except OSError:
        beat = ""
    return (f"{path.parent} is in use by another run: {who}{beat}; wait for it to end or use another exp_name. If that "
            f"run is gone (its node failed), delete {path}; a lock not refreshed for {LOCK_STALE_S / 60:.0f} minutes "
            "is taken over without asking")


# ----- a fresh run over a checkpoint -----------------------------------------------------------------------
def progress_of(ckpt_file: Path) -> str:
    """`finished, 8 of 8 epochs`, `unfinished, 3 of 8 epochs done` or `interrupted at iteration 5 of epoch 4 of 8`."""
    try:
        ckpt = load_checkpoint(ckpt_file, mmap=True)
    except UserError:
        return "unreadable"
    done, it = int(ckpt.get("start_epoch", 0)), int(ckpt.get("iteration", 0) or 0)
    total = (ckpt.get("config") or {}).get("max_epoch")
    of = f" of {total}" if total else ""
    if it:
        return f"interrupted at iteration {it} of epoch {done + 1}{of}"
    if total and done >= total:
        return f"finished, {done}{of} epochs"
    return f"unfinished, {done}{of} epochs done"


def refuse_or_move_aside(folder: Path, names: tuple[str, ...], overwrite: bool, folder_option: str) -> list[Path]:
    """A fresh run (no --resume) into a folder holding checkpoints `names`: one line saying what is there and the
    three ways on, or with `overwrite` their move (with the run's reconstructions) into
    `<folder>/overwritten-<time>/`. Returns the moved files' new paths."""
    present = [folder / n for n in names if (folder / n).is_file()]
    if not present:
        return []
    if not overwrite:
        raise UserError(f"{folder} already holds a run ({present[0].name}: {progress_of(present[0])}): continue it "
                        f"with --resume (raise -e to train longer), use another {folder_option}, or start over with "
                        f"--overwrite (its checkpoints are moved to {folder / (MOVED_PREFIX + '<time>')}/, nothing "
                        "is deleted)")
    target = folder / (MOVED_PREFIX + time.strftime(_STAMP))
    while target.exists():  # two overwrites within a second
        target = target.with_name(target.name + "-1")
    target.mkdir()
    moved = []
    for src in present + sorted(folder.glob("reconstruction_ep*.png")):
        os.replace(src, target / src.name)
        moved.append(target / src.name)
    return moved


# ----- --resume of a run with nothing left to do -----------------------------------------------------------
def finished_run(ckpt_file: Path, max_epoch: int) -> Optional[dict[str, Any]]:
    """For `--resume` of a checkpoint that already holds `max_epoch` epochs: the line to show and the run's numbers;
    None when there is training left, or when the file is missing or unreadable (the resume itself says so)."""
    try:
        ckpt = load_checkpoint(ckpt_file, mmap=True)
        done, it = int(ckpt["start_epoch"]), int(ckpt.get("iteration", 0) or 0)
    except (UserError, KeyError, TypeError, ValueError):
        return None
    if done < max_epoch:
        return None
    loss = ckpt.get("last_loss")
    loss = loss if isinstance(loss, float) and math.isfinite(loss) else float("nan")
    shown = f" (last loss {loss:.4f})" if math.isfinite(loss) else ""
    what = (f"already finished {done} of {max_epoch} epochs{shown}" if done == max_epoch and not it
            else f"already holds {done} epochs{shown}, more than -e {max_epoch}")
    return {"line": f"run {ckpt_file.parent} {what}: nothing to do; raise -e to train longer", "epochs": done,
            "last_loss": loss, "checkpoint": str(ckpt_file)}
