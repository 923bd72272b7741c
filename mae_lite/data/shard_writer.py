"""Writing WebDataset shards (`ssl_prepare`, `write_shards`) from an image folder or any `dataset=` of ours.

One sample = the image bytes (`jpg`: the source file's own bytes when it is a JPEG that needs no resizing,
else re-encoded as JPEG at `quality`, or as lossless PNG with `image_format="png"`), `cls` (the class index) and
`src.txt` (where it came from). Samples are written in a seeded random order (`shuffle_seed`; None keeps the
source's order), so that every shard holds a mix of classes. Shard k holds positions k*S .. (k+1)*S - 1 of that
order; it is written to a hidden temporary file and renamed when complete, and `.index.partial.json` records
the shards done, so a killed run resumes where it stopped and never leaves a broken shard under a final name.
With the same source and options the shards are byte for byte the same (fixed tar times).
"""
from __future__ import annotations

import datetime
import io
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from .._optional import require
from ..errors import UserError
from .shards import INDEX_FORMAT, INDEX_NAME, PARTIAL_NAME

JPEG_MAGIC = b"\xff\xd8\xff"
SHARD_PATTERN = "shard-{:06d}.tar"
FEATURE = "writing WebDataset shards"  # what needs webdataset, in the message when it is missing


@dataclass
class RawSource:
    """Images without transforms: `read(i)` -> (a file path, a uint8 array or a PIL image; label; the file's name
    or "")."""
    description: str
    classes: list[str]
    size: int
    read: Callable[[int], tuple[Any, int, str]]


def raw_source(ds, description: str) -> RawSource:
    """The raw items of one of our data sets (build_dataset(..., transform=None)): file paths where it reads files
    (ImageFolder, the transfer sets), arrays where it holds them (CIFAR, Fashion-MNIST), else its PIL images."""
    classes = [str(c) for c in getattr(ds, "classes", [])]
    samples = getattr(ds, "samples", None)  # torchvision ImageFolder: [(path, label)]
    if isinstance(samples, list):
        root = Path(getattr(ds, "root", "."))
        return RawSource(description, classes, len(samples),
                         lambda i: (Path(samples[i][0]), int(samples[i][1]), _rel(samples[i][0], root)))
    files, targets = getattr(ds, "files", None), getattr(ds, "targets", None)
    if files is not None and targets is not None:
        return RawSource(description, classes, len(files), lambda i: (Path(files[i]), int(targets[i]), str(files[i])))
    images = getattr(ds, "images", None)
    if isinstance(images, np.ndarray) and targets is not None:
        return RawSource(description, classes, len(images), lambda i: (images[i], int(targets[i]), ""))
    return RawSource(description, classes, len(ds), lambda i: (*ds[i], ""))


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def open_source(src: str, split: str = "train", data_root: str = "./data") -> RawSource:
    """`src`: a class-per-sub-folder tree (read whole), or any `dataset=` name of ours read from `data_root`."""
    from .datasets import build_dataset, image_folder
    from .demo import list_demo_photos

    if src.startswith("wds:"):
        raise UserError(f"--src {src} is already shards; give the images they were made from")
    path = Path(src).expanduser()
    if path.is_dir():
        return raw_source(image_folder(path, None, "image folder"), str(path))
    if src.lower() == "demo":  # the 13 photos once each (as a data set it cycles them)
        photos = list_demo_photos()
        return RawSource("demo", [p.stem for p in photos], len(photos), lambda i: (photos[i], i, photos[i].name))
    if "/" in src and not src.startswith("folder:"):
        raise UserError(f"--src {src}: no such folder; give a class-per-sub-folder tree of images or a dataset name "
                        "(FashionMNIST, CIFAR10, Flowers, folder:<path>, ...)")
    return raw_source(build_dataset(src, data_root, split, None), f"{src} ({split})")


def encode(payload: Any, max_side: Optional[int], quality: int, image_format: str) -> tuple[str, bytes, bool]:
    """(extension, bytes, re-encoded?) of one image. A JPEG file is kept as it is unless it must shrink."""
    if isinstance(payload, Path):
        data = payload.read_bytes()
        jpeg = data[:3] == JPEG_MAGIC
        if jpeg and max_side is None:
            return "jpg", data, False
        img = Image.open(io.BytesIO(data))
        if jpeg and max(img.size) <= max_side:
            return "jpg", data, False
    elif isinstance(payload, np.ndarray):
        img = Image.fromarray(payload)
    else:
        img = payload
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)  # DCT-domain first for JPEGs
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # as the loaders convert (CMYK, palette, alpha)
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, "PNG")
        return "png", buf.getvalue(), True
    img.save(buf, "JPEG", quality=quality)
    return "jpg", buf.getvalue(), True


# ----- the run ---------------------------------------------------------------------------------
def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Job:
    """One run's source, order and options; module-global while it runs, so forked workers share it."""

    def __init__(self, source: RawSource, out: Path, order: list[int], shard_size: int, max_side: Optional[int],
                 quality: int, image_format: str):
        self.source, self.out, self.order, self.shard_size = source, out, order, shard_size
        self.max_side, self.quality, self.image_format = max_side, quality, image_format

    def positions(self, k: int) -> range:
        return range(k * self.shard_size, min(len(self.order), (k + 1) * self.shard_size))

    def write(self, k: int, tick: Callable[[int], None] = lambda n: None) -> tuple[dict[str, Any], str]:
        """Shard k under a temporary name: (its index entry, the temporary path)."""
        wds = require("webdataset", FEATURE)
        name = SHARD_PATTERN.format(k)
        tmp = self.out / f".{name}.{os.getpid()}.tmp"
        entry = {"name": name, "samples": 0, "re_encoded": 0, "skipped": []}
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            for p in self.positions(k):
                payload, label, where = self.source.read(self.order[p])
                try:
                    ext, data, redone = encode(payload, self.max_side, self.quality, self.image_format)
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    entry["skipped"].append(f"{where or f'item {self.order[p]}'}: not a readable image "
                                            f"({type(e).__name__})")
                    tick(1)
                    continue
                sample = {"__key__": f"{p:09d}", ext: data, "cls": str(label).encode()}
                if where:  # a file's path (an array item is its position in the source: no entry, 1 KiB less of tar)
                    sample["src.txt"] = where.encode()
                writer.write(sample)
                entry["samples"] += 1
                entry["re_encoded"] += int(redone)
                tick(1)
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        entry["bytes"] = tmp.stat().st_size
        return entry, str(tmp)


_JOB: Optional[_Job] = None


def _write_in_worker(k: int) -> tuple[int, dict[str, Any], str]:
    return (k, *_JOB.write(k))


def _options(source: RawSource, max_side, quality, shard_size, image_format, shuffle_seed) -> dict[str, Any]:
    return {"source": source.description, "images": source.size, "classes": len(source.classes),
            "max_side": max_side, "quality": quality, "shard_size": shard_size, "format": image_format,
            "shuffle_seed": shuffle_seed}


def _resume_state(out: Path, options: dict[str, Any]) -> tuple[Optional[dict], dict[str, dict]]:
    """(the finished index if this exact run is complete, the shards of an unfinished one that are intact)."""
    for name in (INDEX_NAME, PARTIAL_NAME):
        path = out / name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
            theirs = record["made"]["options"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path} is unreadable; delete {out} (or choose another --out) and run again") from None
        if theirs != options:
            diff = ", ".join(f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in options.items() if theirs.get(k) != v)
            raise UserError(f"--out {out} holds shards made with other options ({diff}); choose another --out, "
                            "or delete it to start again")
        if name == INDEX_NAME:
            return record, {}
        done = {e["name"]: e for e in record["shards"]
                if (out / e["name"]).is_file() and (out / e["name"]).stat().st_size == e["bytes"]}
        return None, {"made": record["made"], **done}
    if any(out.glob("shard-*.tar")):
        raise UserError(f"--out {out} holds shard files but no ssl_prepare record ({INDEX_NAME} or {PARTIAL_NAME}); "
                        "choose another --out, or delete those files")
    return None, {}


def write_shards(src: str | RawSource, out: str | Path, *, split: str = "train", data_root: str = "./data",
                 max_side: Optional[int] = None, quality: int = 90, shard_size: int = 1000, image_format: str = "jpeg",
                 shuffle_seed: Optional[int] = 0, workers: int = 1, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write `src` (see open_source, or a RawSource) as shards + index.json under `out`; returns the index.
    Running it again after a kill finishes the job; with the run complete it only reports."""
    if max_side is not None and max_side < 1:
        raise UserError(f"--max-side must be >= 1, got {max_side}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {quality}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if image_format not in ("jpeg", "png"):
        raise UserError(f"--format must be jpeg or png, got {image_format!r}")
    require("webdataset", FEATURE)  # here, not in a writer process, where it would fail with a traceback
    source = src if isinstance(src, RawSource) else open_source(src, split, data_root)
    if source.size == 0:
        raise UserError(f"{source.description} holds no images")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = _options(source, max_side, quality, shard_size, image_format, shuffle_seed)
    finished, done = _resume_state(out, options)
    if finished is not None:
        log(f"ssl_prepare: {out} is already complete: {finished['num_samples']} images in "
            f"{len(finished['shards'])} shards ({out / INDEX_NAME})")
        return finished
    made = done.pop("made", None) or {
        "options": options, "split": split, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mae_lite": _version("mae-lite"), "webdataset": _version("webdataset")}
    for stale in out.glob(".shard-*.tmp"):  # a killed run's unfinished shard
        stale.unlink()
    order = list(range(source.size))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(source.size).tolist()
    job = _Job(source, out, order, shard_size, max_side, quality, image_format)
    n_shards = -(-source.size // shard_size)
    todo = [k for k in range(n_shards) if SHARD_PATTERN.format(k) not in done]

    def record() -> dict[str, Any]:
        shards = [done[n] for n in sorted(done)]
        return {"format": INDEX_FORMAT, "version": 1, "classes": source.classes,
                "num_samples": sum(e["samples"] for e in shards), "shards": shards, "made": made}

    def commit(entry: dict[str, Any], tmp: str) -> None:
        os.replace(tmp, out / entry["name"])  # complete, then visible under its final name
        for line in entry["skipped"]:
            log(f"ssl_prepare: skipped an unreadable image: {line}")
        done[entry["name"]] = entry
        _atomic_json(out / PARTIAL_NAME, record())

    _atomic_json(out / PARTIAL_NAME, record())
    t0 = time.perf_counter()
    already = sum(len(job.positions(k)) for k in range(n_shards)) - sum(len(job.positions(k)) for k in todo)
    from tqdm import tqdm

    with tqdm(total=source.size, initial=already, unit="img", desc="ssl_prepare", disable=not progress,
              dynamic_ncols=True) as bar:
        if workers <= 1 or len(todo) <= 1:
            for k in todo:
                commit(*job.write(k, bar.update))
        else:
            global _JOB
            _JOB = job
            try:
                with multiprocessing.get_context("fork").Pool(min(workers, len(todo))) as pool:
                    for k, entry, tmp in pool.imap_unordered(_write_in_worker, todo):
                        commit(entry, tmp)
                        bar.update(len(job.positions(k)))
            finally:
                _JOB = None
    index = record()
    _atomic_json(out / INDEX_NAME, index)
    (out / PARTIAL_NAME).unlink()
    secs = time.perf_counter() - t0
    written = sum(len(job.positions(k)) for k in todo)
    total_bytes = sum(e["bytes"] for e in index["shards"])
    skipped = sum(len(e["skipped"]) for e in index["shards"])
    log(f"ssl_prepare: {index['num_samples']} images of {len(source.classes)} classes in {n_shards} shards, "
        f"{total_bytes / 2 ** 20:.1f} MiB, under {out} ({sum(e['re_encoded'] for e in index['shards'])} re-encoded, "
        f"{skipped} skipped{f', {already} were done before' if already else ''}); this run {written} images in "
        f"{secs:.1f} s, {written / max(secs, 1e-9):.0f} img/s; index {out / INDEX_NAME}")
    return index


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
