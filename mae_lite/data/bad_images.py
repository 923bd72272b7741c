"""Undecodable images: skipped (and counted) in training, an error in evaluation; never a decoder traceback.

A dataset returns `(BadImage(path, reason), target)` for a file it cannot decode; `collate` fills its place in the
batch with a copy of a good item of the same batch (so batch sizes, which mixup and DDP rely on, never change) and
appends the BadImage list to the batch; the recipe's `device_batch` (main process) hands the list to a
`BadImageCounter`, which warns once per file, stops the run past the limit (training) or at once (evaluation).
Per-epoch counts are merged over the ranks by `BadImageCounter.report` (the recipe's `data_report`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from PIL import Image
from torch.utils.data._utils.collate import default_collate

from ..errors import UserError

LIMIT_FRACTION = 0.001  # max_bad_images default: 0.1 % of the training set...
LIMIT_MIN = 10  # ...but at least this many
LOGGER = logging.getLogger("mae_lite")  # the training log
FIX = ("replace or delete these files (or re-encode them as RGB JPEG/PNG), or allow more with "
       "--exp-options max_bad_images=N")


@dataclass(frozen=True)
class BadImage:
    """A file that could not be decoded, and why (the decoder's message)."""

    path: str
    reason: str


class BadList(list):
    """The BadImage records of one batch, appended to it by `collate`."""


def bad_item(path: str, error: BaseException) -> BadImage:
    text = str(error).splitlines()[0] if str(error) else ""
    if ".cpp:" in text:  # torchvision's "decode_jpeg, <source file>:<line>, <message>": the message
        text = text.rsplit(", ", 1)[-1]
    return BadImage(str(path), f"{type(error).__name__}: {text}".strip())


def collate(items: Sequence[tuple[Any, Any]], inner=default_collate):
    """Batch `(image, target)` items; BadImage items are replaced by copies of good ones and listed after the batch:
    `(images, target, BadList)`. A batch with no good item at all: `(None, None, BadList)`."""
    bad = BadList(item[0] for item in items if isinstance(item[0], BadImage))
    if not bad:
        return inner(items)
    good = [item for item in items if not isinstance(item[0], BadImage)]
    if not good:
        return None, None, bad
    filled = good + [good[k % len(good)] for k in range(len(bad))]
    images, target = inner(filled)
    return images, target, bad


def split_batch(batch: Any) -> tuple[Any, BadList]:
    """(the batch without its BadList, the BadList or an empty one)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[2], BadList):
        return (batch[0], batch[1]), batch[2]
    return batch, BadList()


def default_limit(n_train: Optional[int]) -> int:
    return max(LIMIT_MIN, math.ceil(LIMIT_FRACTION * (n_train or 0)))


class BadImageCounter:
    """Distinct undecodable files seen by this process (this epoch and the whole run), with the stop rules."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen: dict[str, str] = {}  # path -> reason, in the order first met (the whole run, all ranks after report)
        self.epoch: dict[str, str] = {}

    def add(self, bad: Sequence[BadImage], train: bool) -> None:
        if not bad:
            return
        if not train:
            b = bad[0]
            raise UserError(f"evaluation image {b.path} cannot be decoded ({b.reason}); an evaluation set must be "
                            "complete (a skipped image would change the metric): replace or delete the file")
        for b in bad:
            if b.path not in self.seen:
                LOGGER.warning("skipping a training image that cannot be decoded: %s (%s)", b.path, b.reason)
                self.seen[b.path] = b.reason
            self.epoch.setdefault(b.path, b.reason)
        self.check()

    def all_bad_batch(self) -> UserError:
        files = ", ".join(list(self.seen)[-3:])
        return UserError(f"no image of a training batch could be decoded (e.g. {files}); {FIX}")

    def check(self) -> None:
        if len(self.seen) > self.limit:
            first = ", ".join(f"{p} ({r})" for p, r in list(self.seen.items())[:5])
            raise UserError(f"{len(self.seen)} training images cannot be decoded, more than max_bad_images="
                            f"{self.limit}; the first: {first}; {FIX}")

    def report(self, env) -> dict[str, Any]:
        """This epoch's distinct bad files over all ranks, the run's total; resets the epoch. Stops past the limit."""
        local = dict(self.epoch)
        if getattr(env, "distributed", False):
            import torch.distributed as dist

            gathered: list[Optional[dict[str, str]]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            merged: dict[str, str] = {}
            for part in gathered:
                merged.update(part or {})
            local = merged
        for path, reason in local.items():
            self.seen.setdefault(path, reason)
        self.epoch = {}
        self.check()
        report: dict[str, Any] = {"bad_images": len(local), "bad_images_total": len(self.seen)}
        if self.seen:  # every one (at most max_bad_images + 1): --resume restores the run's count from it
            report["bad_image_files"] = dict(self.seen)
        return report

    def restore(self, report: dict[str, Any]) -> None:
        """The run's bad files as a checkpoint's `data` report holds them (--resume), so the count and the
        max_bad_images limit go on across a restart instead of starting from zero."""
        files = report.get("bad_image_files") or {}
        if isinstance(files, list):  # first-20 lists of earlier checkpoints: the names, without reasons
            files = dict.fromkeys(files, "seen before --resume")
        self.seen = {**dict(files), **self.seen}


def load(source: Any, transform, name: str):
    """`transform(image)` for a file path or file-like `source`, or a BadImage naming `name` if it cannot be
    decoded (any decoder failure: truncated data, not an image, a mode PIL cannot convert...). Transforms marked
    `takes_lazy` get the opened, undecoded image (DCT-scaled decoding); others an RGB image, as before."""
    try:
        img = Image.open(source)
        if transform is None or not getattr(transform, "takes_lazy", False):
            img = img.convert("RGB")
        return transform(img) if transform is not None else img
    except Exception as e:  # noqa: BLE001 - every decoder error is counted, none is a traceback
        return bad_item(name, e)
