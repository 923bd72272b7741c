"""`dataset=wds:<dir or brace pattern>`: WebDataset tar shards written by `ssl_prepare`, read in parallel.

A shard sample is an encoded image (`jpg` or `png`) + its class index (`cls`); `<dir>/index.json` lists the
classes and every shard with its sample count, so an epoch's length is known before reading a byte.

Training: every epoch the shards are put in a seeded order (seed, epoch) and the samples of that sequence are cut
into contiguous ranges, one per (rank, loader worker), each a whole number of batches; every rank gets
`len(dataset) // (world * batch)` batches (the remainder, under one global batch, is dropped that epoch, as
`DistributedSampler(drop_last=True)` does), so DDP never waits on a rank with less data, and no sample is read
twice in an epoch. Each worker shuffles its range in a buffer seeded from (seed, epoch, rank, worker) and reseeds
the augmentation per batch, so the whole epoch is a deterministic function of (seed, epoch, world size, rank,
workers, batch, shards): `set_start(k)` skips the first k batches (read, not decoded) and yields exactly the rest
of the uninterrupted epoch. Evaluation: the samples in index order, split into disjoint contiguous ranges, every
image exactly once (no padding), the last batch of each worker possibly short.
"""
from __future__ import annotations

import bisect
import io
import json
import math
import multiprocessing
import random
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from .._optional import require
from ..errors import UserError
from .bad_images import load
from .seeding import run_seeded

INDEX_NAME = "index.json"
PARTIAL_NAME = ".index.partial.json"  # an unfinished ssl_prepare run's record of the shards done so far
INDEX_FORMAT = "mae-lite-wds"
FEATURE = "reading WebDataset shards (dataset=wds:)"  # what needs webdataset, in the message when it is missing
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # samples per loader worker; the shards themselves are written in a shuffled order


def _prepare_hint(where: Path | str) -> str:
    return f"write them with `ssl_prepare --src <image folder or dataset> --out {where}` (docs/data.md)"


def load_image(data: bytes, transform: Optional[Callable], name: str):
    """`transform(image)` of a sample's bytes, as the folder data sets load files (bad_images.load: an undecodable
    image becomes a BadImage that the recipe's collate counts and skips; lazy JPEGs for the fast transforms)."""
    return load(io.BytesIO(data), transform, name)


# ----- the index -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    path: str
    samples: int  # samples read from the start of the shard (fewer than it holds under a limit)


def read_index(folder: Path) -> dict[str, Any]:
    """`<folder>/index.json`, checked; one line saying what to do when it is missing or unreadable."""
    path = folder / INDEX_NAME
    if not folder.is_dir():
        raise UserError(f"wds shards not found: no folder {folder}; {_prepare_hint(folder)}")
    if not path.is_file():
        partial = folder / PARTIAL_NAME
        if partial.is_file():
            raise UserError(f"{folder} holds an unfinished ssl_prepare run (no {INDEX_NAME} yet): run the same "
                            "ssl_prepare command again to finish it")
        raise UserError(f"{folder} has no {INDEX_NAME} (shards and their index are written by ssl_prepare); "
                        f"{_prepare_hint(folder)}")
    try:
        index = json.loads(path.read_text())
        ok = (index.get("format") == INDEX_FORMAT and isinstance(index.get("classes"), list)
              and all(isinstance(s.get("name"), str) and isinstance(s.get("samples"), int) for s in index["shards"]))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{path} is not an ssl_prepare index (unreadable or another format); "
                        f"write the shards again: {_prepare_hint(folder)}")
    return index


def _checked(folder: Path, entries: list[dict[str, Any]]) -> list[Shard]:
    """The index's shards that exist with the size the index recorded (a partial copy is refused)."""
    shards = []
    for e in entries:
        path = folder / e["name"]
        if not path.is_file():
            raise UserError(f"shard {path} listed in {folder / INDEX_NAME} is missing; copy it there or run "
                            f"ssl_prepare again ({_prepare_hint(folder)})")
        size = path.stat().st_size
        if "bytes" in e and size != e["bytes"]:
            raise UserError(f"shard {path} is {size} bytes but {folder / INDEX_NAME} says {e['bytes']} "
                            "(an incomplete copy?); copy it again or run ssl_prepare again")
        shards.append(Shard(str(path), int(e["samples"])))
    return shards


def _split_folder(root: Path, split: str) -> Path:
    """`<root>/train/` + `<root>/val/` (or `test/`), each with an index, give a split each; a folder with its own
    index serves both splits (as `folder:` trees do)."""
    if (root / INDEX_NAME).is_file() or not (root / "train" / INDEX_NAME).is_file():
        return root
    if split == "train":
        return root / "train"
    for name in ("val", "test"):
        if (root / name / INDEX_NAME).is_file():
            return root / name
    raise UserError(f"{root} has train/ shards but no val/ (or test/) shards for the eval split; "
                    f"write them with `ssl_prepare --src <eval images> --split eval --out {root / 'val'}`")


def resolve_shards(spec: str, split: str) -> tuple[list[Shard], list[str], str]:
    """(shards, classes, description) of `wds:<spec>`: a folder written by ssl_prepare (or one with train/ and val/
    such folders), or a brace pattern of shard files in such a folder (`dir/shard-{000000..000009}.tar`)."""
    if not spec:
        raise UserError("dataset=wds: needs a folder or a pattern, e.g. dataset=wds:data/imagenet_wds/train; "
                        + _prepare_hint("data/imagenet_wds/train"))
    if "{" not in spec:
        folder = _split_folder(Path(spec), split)
        index = read_index(folder)
        return _checked(folder, index["shards"]), list(index["classes"]), str(folder)
    names = list(require("braceexpand", FEATURE).braceexpand(spec))
    folders = {Path(n).parent for n in names}
    if len(folders) != 1:
        raise UserError(f"wds:{spec} spans several folders ({', '.join(sorted(map(str, folders)))[:200]}); "
                        "a pattern must name shards of one ssl_prepare folder")
    folder = folders.pop()
    index = read_index(folder)
    listed = {e["name"]: e for e in index["shards"]}
    chosen = [listed[Path(n).name] for n in names if Path(n).name in listed]
    if not chosen:
        first = index["shards"][0]["name"] if index["shards"] else "none"
        raise UserError(f"wds:{spec} matches no shard listed in {folder / INDEX_NAME} (its shards are named like "
                        f"{first}); fix the pattern, or give the folder: wds:{folder}")
    return _checked(folder, chosen), list(index["classes"]), f"{spec} ({len(chosen)} of {len(listed)} shards)"


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard file, in order (webdataset's tar reader)."""
    return require("webdataset.tariterators", FEATURE).tarfile_samples([{"url": path}])


def _item(sample: dict[str, Any], path: str) -> tuple[bytes, int, str]:
    """(image bytes, label, name for messages) of a shard sample."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None or "cls" not in sample:
        raise UserError(f"shard {path}: sample {sample.get('__key__')} has no image ({'/'.join(IMAGE_KEYS)}) or no "
                        "cls entry; write the shards with ssl_prepare")
    source = sample.get("src.txt", b"").decode(errors="replace")
    return data, int(sample["cls"]), f"{path}:{sample['__key__']}" + (f" ({source})" if source else "")


# ----- the epoch plan (pure: a function of its arguments only) ---------------------------------------
@dataclass(frozen=True)
class Segment:
    shard: int  # index into the dataset's shard list
    start: int  # first sample within the shard
    stop: int  # one past the last


def _cut(order: list[int], counts: list[int], lo: int, hi: int) -> list[Segment]:
    """Samples [lo, hi) of the concatenation of the shards in `order`, as per-shard segments."""
    segments, pos = [], 0
    for s in order:
        a, b = max(lo, pos), min(hi, pos + counts[s])
        if a < b:
            segments.append(Segment(s, a - pos, b - pos))
        pos += counts[s]
        if pos >= hi:
            break
    return segments


def share(total: int, parts: int, k: int) -> int:
    """How many of 0..total-1 are congruent to k modulo `parts` (batch b goes to loader worker b % parts)."""
    return max(0, (total - k + parts - 1) // parts)


def train_batches(counts: list[int], world: int, batch: int) -> int:
    """Training batches per rank and epoch: the same on every rank."""
    return sum(counts) // (world * batch)


def eval_ranges(n: int, world: int, rank: int, workers: int) -> list[tuple[int, int]]:
    """Disjoint contiguous sample ranges [lo, hi) of this rank's loader workers; all of them cover 0..n-1."""
    lo, hi = n * rank // world, n * (rank + 1) // world
    return [(lo + (hi - lo) * w // workers, lo + (hi - lo) * (w + 1) // workers) for w in range(workers)]


def epoch_plan(counts: list[int], *, world: int, rank: int, workers: int, batch: int, train: bool, seed: int,
               epoch: int) -> list[tuple[list[Segment], int]]:
    """Per loader worker of this rank: (its segments, its batches). Training: a seeded shard order per epoch and
    an equal number of full batches per rank; evaluation: index order, every sample once."""
    workers = max(1, workers)
    if not train:
        plans = []
        for lo, hi in eval_ranges(sum(counts), world, rank, workers):
            plans.append((_cut(list(range(len(counts))), counts, lo, hi), math.ceil((hi - lo) / batch)))
        return plans
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)).tolist()
    per_rank = train_batches(counts, world, batch)
    pos, plans = rank * per_rank * batch, []
    for w in range(workers):
        n = share(per_rank, workers, w)
        plans.append((_cut(order, counts, pos, pos + n * batch), n))
        pos += n * batch
    return plans


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# ----- the data set and its loader -------------------------------------------------------------------
class ShardDataset(Dataset):
    """The samples of `shards`, through `transform` as the folder data sets: items are `(transform(image), label)`.

    Iterate it with `make_loader(...)` (sequential reads, per-epoch shuffling, exact splits). Indexing
    (`ds[i]`) also works, for a few items (e.g. the images shown in reconstructions): it reads the item's shard
    and keeps that one shard's bytes in memory."""

    def __init__(self, shards: list[Shard], classes: list[str], transform: Optional[Callable], seed: int = 0,
                 where: str = "", shuffle_buffer: int = SHUFFLE_BUFFER):
        self.shards, self.classes, self.transform = list(shards), list(classes), transform
        self.seed, self.where, self.shuffle_buffer = int(seed), where, shuffle_buffer
        self._starts = np.cumsum([0] + [s.samples for s in self.shards]).tolist()
        self._cache: tuple[int, list[tuple[bytes, int, str]]] = (-1, [])

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"ShardDataset({len(self)} images in {len(self.shards)} shards from {self.where})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": (-1, [])}  # loader workers do not inherit a cached shard

    def head(self, n: int) -> "ShardDataset":
        """The first `n` samples in index order (train_limit / eval_limit)."""
        shards, left = [], n
        for s in self.shards:
            if left <= 0:
                break
            shards.append(replace(s, samples=min(s.samples, left)))
            left -= shards[-1].samples
        return ShardDataset(shards, self.classes, self.transform, self.seed, self.where, self.shuffle_buffer)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        k = bisect.bisect_right(self._starts, i) - 1
        if self._cache[0] != k:
            shard = self.shards[k]
            items = [_item(s, shard.path) for _, s in zip(range(shard.samples), read_shard(shard.path))]
            self._cache = (k, items)
        data, label, name = self._cache[1][i - self._starts[k]]
        return load_image(data, self.transform, name), label

    def make_loader(self, batch: int, workers: int, train: bool, collate_fn: Optional[Callable] = None,
                    pin_memory: bool = False, env=None) -> "ShardLoader":
        """The loader the training loop and evaluation ask for (see ShardLoader). `env`: the DistEnv (rank,
        world size); training agrees on rank 0's seed (one broadcast) so every rank cuts the same plan."""
        rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
        seed = self.seed
        if train and world > 1 and torch.distributed.is_initialized():
            box = [seed]
            torch.distributed.broadcast_object_list(box, src=0)
            seed = int(box[0])
        stream = _EpochStream(self, batch, max(0, workers), train, collate_fn or default_collate, rank, world, seed)
        return ShardLoader(stream, pin_memory)


class ShardLoader:
    """Iterable over one epoch's batches of this rank. `len()` is the epoch's number of batches (training: the
    same on every rank); `set_epoch(e)` before each epoch picks its order (and starts it at batch 0);
    `set_start(k)` after it starts the epoch at batch k (a mid-epoch resume: batches k.. of the epoch, equal to an
    uninterrupted run's)."""

    sampler = None  # not a sampler-driven DataLoader

    def __init__(self, stream: "_EpochStream", pin_memory: bool):
        self.stream = stream
        # Persistent workers, which read the epoch and start from shared memory when an epoch begins; forked (as
        # DataLoader does by default on Linux, also under ssl_train's spawned processes) so they start in
        # milliseconds; a private generator keeps the DataLoader from drawing from the training's random stream.
        n = stream.workers
        fork = "fork" if n and "fork" in multiprocessing.get_all_start_methods() else None
        self.loader = DataLoader(stream, batch_size=None, num_workers=n, pin_memory=pin_memory,
                                 persistent_workers=n > 0, multiprocessing_context=fork,
                                 generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.stream.batches_per_epoch()

    def set_epoch(self, epoch: int) -> None:
        self.stream.state[0], self.stream.state[1] = int(epoch), 0

    def set_start(self, batches_done: int) -> None:
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"set_start({batches_done}) outside 0..{len(self)} batches of the epoch")
        self.stream.state[1] = int(batches_done)

    def __iter__(self):
        return iter(self.loader)


class _EpochStream(IterableDataset):
    """Batches of one epoch; in loader worker w it plays the plan's worker (w + start) % workers, so that the
    DataLoader's round robin over workers yields the batches in epoch order, also after a skip."""

    def __init__(self, ds: ShardDataset, batch: int, workers: int, train: bool, collate: Callable, rank: int,
                 world: int, seed: int):
        self.ds, self.batch, self.workers, self.train, self.collate = ds, batch, workers, train, collate
        self.rank, self.world, self.seed = rank, world, seed
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, start: seen by the workers

    def counts(self) -> list[int]:
        return [s.samples for s in self.ds.shards]

    def plan(self, epoch: int) -> list[tuple[list[Segment], int]]:
        return epoch_plan(self.counts(), world=self.world, rank=self.rank, workers=self.workers, batch=self.batch,
                          train=self.train, seed=self.seed, epoch=epoch)

    def batches_per_epoch(self) -> int:
        if self.train:
            return train_batches(self.counts(), self.world, self.batch)
        return sum(n for _, n in self.plan(0))

    def __iter__(self):
        info = get_worker_info()
        k = max(1, self.workers)
        w = info.id if info is not None else 0
        epoch, start = int(self.state[0]), int(self.state[1])  # read now, not when the first batch is asked for
        logical = (w + start) % k
        segments, n_batches = self.plan(epoch)[logical]
        skip = share(start, k, logical)  # this worker's batches before `start`
        return self._batches(segments, n_batches, epoch, logical, skip, in_worker=info is not None)

    def _samples(self, segments: list[Segment]) -> Iterator[tuple[bytes, int, str]]:
        for seg in segments:
            path = self.ds.shards[seg.shard].path
            try:
                for i, sample in enumerate(read_shard(path)):
                    if i >= seg.stop:
                        break
                    if i >= seg.start:
                        yield _item(sample, path)
            except (OSError, ValueError, EOFError, tarfile.TarError) as e:  # a truncated or damaged shard
                raise UserError(f"shard {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); "
                                "write it again with ssl_prepare") from None

    def _batches(self, segments, n_batches: int, epoch: int, logical: int, skip: int, in_worker: bool):
        samples = self._samples(segments)
        if self.train:
            rng = random.Random(_seed_of(self.seed, epoch, self.rank, logical))
            size = max(1, self.ds.shuffle_buffer)
            samples = require("webdataset", FEATURE).shuffle(size, size, rng=rng)(samples)
        for j in range(n_batches):
            chunk = [s for _, s in zip(range(self.batch), samples)]
            if j < skip:
                continue  # read (the shuffle buffer moves on exactly as before) but not decoded
            if not self.train:
                yield self._collate(chunk)
                continue
            seed = _seed_of(self.seed, epoch, self.rank, logical, j, 1)
            yield run_seeded(seed, lambda: self._collate(chunk), keep_streams=not in_worker)

    def _collate(self, chunk: list[tuple[bytes, int, str]]):
        return self.collate([(load_image(data, self.ds.transform, name), label) for data, label, name in chunk])


def open_shards(spec: str, split: str, transform: Optional[Callable]) -> ShardDataset:
    """`dataset=wds:<spec>`. The shuffling seed is the recipe's: the loop seeds each rank with seed + rank before
    building the data sets."""
    require("webdataset", FEATURE)  # here, not in a loader worker, where it would fail with a traceback
    shards, classes, where = resolve_shards(spec, split)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return ShardDataset(shards, classes, transform, seed=(torch.initial_seed() - rank) % 2 ** 63, where=where)
