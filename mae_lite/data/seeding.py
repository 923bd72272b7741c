"""Running a piece of data work under a given seed: how augmentations become a function of (seed, position)
rather than of whichever process or worker runs them, which is what makes --resume replay the same crops."""
from __future__ import annotations

import random
from typing import Callable, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_all(seed: int) -> None:
    """torch's, Python's and NumPy's global random streams, all from `seed`."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def run_seeded(seed: int, fn: Callable[[], T], keep_streams: bool) -> T:
    """`fn()` with every global random stream seeded by `seed`. `keep_streams` (in the training process, whose
    streams the run's other randomness and its checkpoints depend on): put them back afterwards; a loader
    worker's streams serve nothing else, so there they are simply reseeded."""
    if not keep_streams:
        seed_all(seed)
        return fn()
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_all(seed)
        try:
            return fn()
        finally:
            random.setstate(py)
            np.random.set_state(npy)
