"""Checkpoints: atomic writes, safe reads, and loading weights of ours or of the original into a network.

Format (the original's): {"start_epoch", "model", "optimizer", "scheduler", "scaler", "best_top1",
"best_top5", "best_top1_epoch"} with model keys `model.<network key>`; we add "arch" (architecture
name and arguments), "recipe" and "config"; runs with model_ema=True add "model_ema" (same layout as "model"),
which `--ema` selects (`select_weights`).
"""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from ..errors import DiskFull, UserError
from ..models.pos_embed import resize_pos_embed


def _create_temp(path: Path) -> tuple[int, str]:
    """A new file next to `path`, created with mode 0666 so the kernel applies the user's umask (mkstemp's 0600
    would make checkpoints unreadable by the group on shared clusters)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # a leftover of the same name: draw another
            continue


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike, last_good: str | os.PathLike | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves a torn file.
    The file gets the mode the user's umask gives (0644 under umask 022). A full disk, a quota or a read-only file
    system is a one-line DiskFull naming the file, the bytes needed and free, and `last_good` (default: `path` as it
    was), which the failed write left intact; the temporary file is removed."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        reason = disk_error(e)
        if reason is None:
            raise
        good = Path(last_good) if last_good is not None else path
        raise DiskFull(no_space_message(f"checkpoint {path}", reason, path.parent, state_bytes(state),
                                        good if good.is_file() else None)) from None


# What a write can meet that is no fault of the run: the user frees space or picks another disk, then --resume.
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}


def disk_error(e: BaseException) -> Optional[str]:
    """The DISK_ERRORS reason behind `e`, also when torch's zip writer wraps the OSError in a RuntimeError of its own
    (raised while the OSError is handled: it is the context); None for anything else."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            return DISK_ERRORS[e.errno]
        e = e.__cause__ or e.__context__
    return None


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: what its file needs, give or take the small rest."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def no_space_message(what: str, reason: str, folder: Path, needed: Optional[int], last_good: Optional[Path]) -> str:
    try:
        free = f"{_mb(shutil.disk_usage(folder).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f"needs about {_mb(needed)}, " if needed else ""
    good = f"the last good checkpoint {last_good} is intact" if last_good else "no checkpoint was written before"
    return (f"cannot write {what}: {reason} ({need}{free}); {good}; free space, or set output_dir= to a disk with "
            "room, then continue with --resume")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n} bytes)"


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint on the CPU with `weights_only=True`; any problem is a one-line UserError. `mmap`: map the
    tensors instead of reading them (a look at the counters of a large file; zip-format files only).

    `argparse.Namespace` is allowed besides tensors and containers: facebookresearch/mae's training
    checkpoints store their arguments as one, and it only holds attributes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torn file, not a torch file, or a pickle that needs arbitrary code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: {first[:200]}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict of tensors")
    return ckpt


EMA_KEY = "model_ema"  # the loop's EMA weights (model_ema=True), laid out as `model`: the method's state dict


def select_weights(ckpt: dict[str, Any], ema: bool, source: str | os.PathLike = "the checkpoint") -> dict[str, Any]:
    """The checkpoint as the weight readers see it: itself, or with `ema` (`--ema`) a copy whose `model` entry is
    the EMA weights, so every reader of `model` picks them. Selecting twice gives the same."""
    if not ema:
        return ckpt
    weights = ckpt.get(EMA_KEY)
    if not isinstance(weights, dict) or not weights:
        raise UserError(f"{source} has no EMA weights ('{EMA_KEY}'): it was trained without model_ema=True; "
                        "drop --ema to use its 'model' weights")
    return {**ckpt, "model": weights}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Network weights from a wrapper's state dict: drop a leading `module.` (DDP), then keep the keys
    under `prefix.` (e.g. `model`, `base_encoder`) with it removed; an empty prefix keeps flat keys."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not prefix:
        return dict(state)
    head = prefix.rstrip(".") + "."
    return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}


def network_state(ckpt: dict[str, Any], prefix: str = "model") -> dict[str, torch.Tensor]:
    """The network's weights inside a checkpoint of ours, the original's, or official MAE (`{"model": flat}`)."""
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("checkpoint has no 'model' dict of tensors")
    net = strip_prefix(state, prefix)
    if not net and prefix:
        sample = ", ".join(list(state)[:3])
        raise UserError(f"no weights under prefix '{prefix}.' in the checkpoint (keys look like: {sample}); "
                        "set weights_prefix= to the right prefix, or weights_prefix='' for flat keys")
    return net


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in the checkpoint, not used
    missing: list[str] = field(default_factory=list)  # in the network, left at initialisation
    resized: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return "" if not keys else " (" + ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") + ")"

        return (f"loaded {len(self.loaded)} tensors; skipped {len(self.skipped)}{few(self.skipped)}; "
                f"left at init {len(self.missing)}{few(self.missing)}"
                + (f"; resized {', '.join(self.resized)}" if self.resized else "")
                + (f"; blocks not in this network: {', '.join(self.extra_blocks)}" if self.extra_blocks else ""))

    @property
    def extra_blocks(self) -> list[str]:
        """`blocks.i` of which nothing loaded and the network has nothing (e.g. D²-MAE's 13th block)."""
        block = lambda k: ".".join(k.split(".")[:2]) if k.startswith("blocks.") else None  # noqa: E731
        here = {block(k) for k in self.loaded + self.missing}
        return sorted({block(k) for k in self.skipped} - here - {None}, key=lambda b: (len(b), b))


def adapt_state(net: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Resize learned position embeddings to the network's grid; keep the network's own fixed tables."""
    own = dict(net.named_parameters())
    own.update(dict(net.named_buffers()))
    out = dict(state)
    for key in [k for k in state if k.endswith("pos_embed") and k in own]:
        target, src = own[key], state[key]
        if src.shape == target.shape:
            continue
        if not target.requires_grad:  # a frozen parameter or a buffer
            del out[key]  # fixed sin-cos: the network's table already fits its grid
            report.missing.append(key)
            continue
        grid = getattr(getattr(net, "patch_embed", None), "grid_size", None)
        if grid is None or src.shape[-1] != target.shape[-1]:
            continue
        prefix = target.shape[1] - grid[0] * grid[1]  # cls (and any other) tokens, as the network has them
        try:
            out[key] = resize_pos_embed(src, tuple(grid), num_prefix=prefix)
        except ValueError:  # not a square grid: left for the shape check to skip
            continue
        report.resized.append(f"{key} {tuple(src.shape)}->{tuple(out[key].shape)}")
    return out


def load_pretrained(net: nn.Module, source: str | os.PathLike | dict, prefix: str = "model",
                    drop: Iterable[str] = (), ema: bool = False) -> LoadReport:
    """Load the matching weights of a checkpoint into `net` (non-strict) and report what happened.

    Keys whose shape differs (other than resizable position embeddings) are skipped, never forced;
    keys containing any string in `drop` are skipped too. `ema`: the EMA weights (`model_ema`) instead.
    """
    if isinstance(source, dict):
        ckpt = select_weights(source, ema)
    else:
        ckpt = select_weights(load_checkpoint(source), ema, source)
    report = LoadReport()
    state = adapt_state(net, network_state(ckpt, prefix), report)
    own = net.state_dict()
    usable = {}
    for key, value in state.items():
        if any(d in key for d in drop) or key not in own or own[key].shape != value.shape:
            report.skipped.append(key)
        else:
            usable[key] = value
    net.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing += [k for k in own if k not in usable and k not in report.missing]
    return report


def load_trained(net: nn.Module, ckpt_path: str | os.PathLike, recipe_name: str, options: str,
                 ema: bool = False) -> None:
    """Load a checkpoint that this recipe trained into `net`, every tensor of the same shape or a one-line refusal
    (`ssl_eval` of a whole task network: detection, segmentation). `options`: the model options to mention."""
    state = network_state(select_weights(load_checkpoint(ckpt_path), ema, ckpt_path), "model")
    own = net.state_dict()
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad or len(state) != len(own):
        raise UserError(f"{ckpt_path} is not a {recipe_name} checkpoint of this shape ({len(bad)} keys missing or "
                        f"of another shape, e.g. {(bad or list(state))[0]}); train one with ssl_train -f {recipe_name}, "
                        f"and give the same model options ({options}, ...)")
    net.load_state_dict(state)


def checkpoint_path(output_path: Path, resume: Optional[str]) -> Path:
    """`--resume` alone: <output>/last_epoch_ckpt.pth.tar; with a value: that file, else <output>/<value>."""
    if resume in (None, "", "auto"):
        return output_path / "last_epoch_ckpt.pth.tar"
    p = Path(resume)
    return p if p.is_file() else output_path / resume
