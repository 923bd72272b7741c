"""The training loader: DistributedSampler's split of a per-epoch permutation, every image's augmentation seeded
from the epoch's seed and its place in the epoch, workers that persist across epochs, and a mid-epoch start
that skips the done batches without loading them.

Why per-image seeds: persistent workers keep their random state from epoch to epoch, and a resumed run starts
fresh ones, so a worker's own stream cannot reproduce an interrupted run's crops. Seeding each image from
(epoch seed, position) makes its crop independent of which worker loads it, of the worker count and of where
the epoch started; the epoch seed is drawn from the main random stream, which --resume restores.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, get_worker_info

from ..data.seeding import run_seeded
from .dist import DistEnv


class EpochSampler(Sampler):
    """This rank's (index, seed) pairs of one epoch, from `start` on. The permutation depends only on `seed` and
    the epoch (the same on every rank); rank r takes places r, r + world, ... of its first
    floor(n / world) * world entries, as DistributedSampler(drop_last=True) does."""

    def __init__(self, n: int, env: DistEnv, shuffle: bool, seed: int):
        self.n, self.rank, self.world, self.shuffle, self.seed = n, env.rank, env.world_size, shuffle, seed
        self.num_samples = n // self.world if shuffle else -(-n // self.world)
        self.epoch, self.item_seed, self.start = 0, 0, 0

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)[: self.num_samples * self.world]
        else:
            order = torch.arange(self.n)
        mine = order[self.rank::self.world].tolist()
        # a list, not a generator: `start` is read now, not when the loader first asks
        return iter([(mine[i], self.item_seed + i) for i in range(self.start, len(mine))])


class SeededItems(Dataset):
    """`dataset[index]` with torch's, Python's and NumPy's random state seeded by the item's seed. In the main
    process (no workers) the training's own streams are put back afterwards."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        return run_seeded(seed, lambda: self.dataset[index], keep_streams=get_worker_info() is None)


class TrainLoader:
    """The training DataLoader with the epoch interface the loop uses for every loader: `len()` batches per
    epoch, `set_epoch(epoch)` before each epoch (draws the epoch's item seed from Python's random stream),
    `set_start(batches_done)` after it for a mid-epoch resume."""

    def __init__(self, dataset: Dataset, batch: int, env: DistEnv, workers: int, train: bool, collate_fn=None,
                 seed: int = 0):
        self.sampler = EpochSampler(len(dataset), env, shuffle=train, seed=seed)
        self.batch, self.drop_last = batch, train
        # a private generator: the DataLoader's worker base seed must not be drawn from the training's stream
        # (it is drawn once with persistent workers, every epoch without, so a resumed run would drift)
        self.loader = DataLoader(SeededItems(dataset), batch_sampler=BatchSampler(self.sampler, batch, train),
                                 num_workers=workers, pin_memory=env.device.type == "cuda",
                                 persistent_workers=workers > 0, collate_fn=collate_fn,
                                 generator=torch.Generator().manual_seed(0))
        self.full = (self.sampler.num_samples // batch) if train else -(-self.sampler.num_samples // batch)

    def __len__(self) -> int:
        return self.full

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch, self.sampler.start = epoch, 0
        self.sampler.item_seed = random.getrandbits(62)

    def set_start(self, batches_done: int) -> None:
        self.sampler.start = batches_done * self.batch

    def __iter__(self):
        return iter(self.loader)

    def close(self) -> None:
        """Stop the persistent workers now (a stopped run's traceback would keep them alive)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def make_loader(dataset, batch: int, env: DistEnv, workers: int, train: bool, collate_fn=None,
                seed: Optional[int] = 0):
    """A dataset that builds its own loader (`dataset.make_loader(...)`, e.g. WebDataset shards) does so;
    any other (map-style) dataset gets a TrainLoader."""
    if hasattr(dataset, "make_loader"):
        return dataset.make_loader(batch, workers, train, collate_fn, env.device.type == "cuda", env)
    return TrainLoader(dataset, batch, env, workers, train, collate_fn, seed=seed or 0)
