"""`ssl_prepare`: an image folder or any `dataset=` of ours as WebDataset shards for `dataset=wds:<out>`."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..data.shard_writer import write_shards
from .common import run_cli

PROG = "ssl_prepare"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Write WebDataset tar shards + index.json for dataset=wds:OUT. "
                                                  "Run it again after an interruption: it continues where it stopped.")
    p.add_argument("--src", required=True, help="a class-per-sub-folder tree of images (read whole), or a dataset "
                                                "name: ImageNet, FashionMNIST, CIFAR10, CIFAR100, Flowers, Pets, "
                                                "Aircraft, Cars, iNat2018, folder:<path>, demo")
    p.add_argument("--out", required=True, help="folder for the shards (shard-000000.tar, ...) and index.json")
    p.add_argument("--split", choices=("train", "eval"), default="train", help="split of a dataset name (default train)")
    p.add_argument("--data-root", "--data_root", dest="data_root", default="./data", help="data_root of dataset names")
    p.add_argument("--max-side", type=int, default=None,
                   help="shrink images whose longer side exceeds N to N (re-encoded); JPEGs within N stay as they are")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--format", dest="image_format", choices=("jpeg", "png"), default="jpeg",
                   help="encoding of images that are (re-)encoded: jpeg at --quality, or lossless png")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the order the images are written in")
    p.add_argument("--keep-order", action="store_true", help="write the images in the source's order")
    p.add_argument("--workers", type=int, default=None, help="processes encoding shards (default: min(8, cores))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    write_shards(args.src, args.out, split=args.split, data_root=args.data_root, max_side=args.max_side,
                 quality=args.quality, shard_size=args.shard_size, image_format=args.image_format,
                 shuffle_seed=None if args.keep_order else args.shuffle_seed,
                 workers=args.workers if args.workers is not None else min(8, _cores()),
                 progress=not args.no_progress)
    return 0


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: Optional[list[str]] = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
