"""Random states of every rank, saved in checkpoints and restored by --resume, so a resumed run continues the
same random streams (torch, CUDA, Python)."""
from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

from .dist import DistEnv


def seed_everything(seed: Optional[int], rank: int) -> None:
    if seed is None:
        return
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def local_rng_state(env: DistEnv) -> dict[str, Any]:
    own = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if env.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(env.device)
    return own


def gather_rng_states(env: DistEnv, own: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Every rank's random state (this moment's unless `own` is given)."""
    own = own if own is not None else local_rng_state(env)
    if not env.distributed:
        return [own]
    states: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(states, own)
    return states


def restore_rng_state(states: Optional[list[dict[str, Any]]], env: DistEnv) -> None:
    if not states or len(states) != env.world_size:
        return  # another world size: keep the fresh seeds
    own = states[env.rank]
    torch.set_rng_state(own["torch"])
    random.setstate(_as_tuple(own["python"]))
    if "cuda" in own and env.device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], env.device)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
