"""Decoded + augmented training images per second per CPU core, on ImageNet-like JPEGs: torchvision ImageFolder +
facebookresearch/mae's pre-training transform (the anchor) next to our paths, in one run.

    python benchmarks/data_speed.py                      # CPU rows
    python benchmarks/data_speed.py --device cuda        # + the GPU decode path (decode_on_device)
    python benchmarks/data_speed.py --device cpu-decode --no-shards --batch 64   # its code, on the CPU
    python benchmarks/data_speed.py --folder /data/imagenet/imagenet_train --no-shards   # your own images

The images: the photos embedded in the package (mae_lite/data/demo/*.jpg, scikit-image's data photos and NASA
images, see their LICENSES.md) resized to 500x375 or 375x500 (alternately) and saved at JPEG quality 90, copied
to --images files in 10 class folders. Rows, each in one process with torch.set_num_threads(1) (one loader worker's
share: a host with N cores delivers about N times the figure):

- anchor: torchvision ImageFolder + RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3), RandomHorizontalFlip,
  ToTensor, Normalize (float32 out), as MAE's main_pretrain.py;
- folder: our `folder:` dataset + the mae_lite recipe's transform (uint8 out; normalisation runs on the device);
- shards: ssl_prepare's shards of the same images, as they are and re-encoded at --max-side 320;
- decode_on_device (with --device cuda, or cpu-decode): workers only read bytes and draw crops (per core); the
  items/s a DataLoader with 2 workers delivers to the main process, packed batches (one byte tensor per batch) and
  the per-image lists used before issue 20 (in-memory items: the transfer alone); then the device decodes and
  crops --decode-batches batches of --batch (img/s of the device; cpu-decode: of one CPU thread).

Rounds alternate the rows (--rounds) so that load from other processes hits them alike; the median per row is
reported. Prints a table and writes --out (JSON).
"""
from __future__ import annotations

import argparse
import datetime
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

import mae_lite
from mae_lite.data import build_dataset, pretrain_transform
from mae_lite.data.demo import list_demo_photos
from mae_lite.recipes.base import IMAGENET_MEAN, IMAGENET_STD
from step_speed import available_cores, cpu_model, write_result

SIZES = ((500, 375), (375, 500))


def make_images(root: Path, n: int, classes: int = 10) -> float:
    """n JPEGs (q90, 500x375 / 375x500) from the embedded photos under root/<class>/; their mean size in bytes."""
    photos = [Image.open(p).convert("RGB") for p in list_demo_photos()]
    sizes = []
    for i in range(n):
        folder = root / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.JPEG"
        photos[i % len(photos)].resize(SIZES[(i // len(photos)) % 2], Image.BICUBIC).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return sum(sizes) / len(sizes)


def anchor_dataset(root: Path):
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return ImageFolder(str(root), transform=tf)


def per_core(dataset, n: int, ordered: bool) -> float:
    """img/s of `dataset[i]` over n items (random order, or index order as shards are read)."""
    idx = list(range(len(dataset)))
    if not ordered:
        random.shuffle(idx)
    idx = (idx * (n // len(idx) + 1))[:n]
    dataset[idx[0]]  # warm (file cache, first shard)
    t = time.perf_counter()
    for i in idx:
        dataset[i]
    return n / (time.perf_counter() - t)


class EncodedItems(Dataset):
    """`length` items cycling over in-memory (EncodedImage, label) pairs, each with a fresh byte tensor (as a worker's
    read_bytes makes one): the loader rows time the batches' way to the main process, not the disk or PIL."""

    def __init__(self, items: list, length: int):
        self.items, self.length = items, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        from mae_lite.data.gpu_decode import EncodedImage

        x, y = self.items[i % len(self.items)]
        return (replace(x, data=x.data.clone()) if isinstance(x, EncodedImage) else x), y


def collate_list(items):
    """The decode_on_device batch before issue 20: a list of EncodedImage, one tensor per image between processes."""
    return [x for x, _ in items], default_collate([y for _, y in items])


def loader_rate(items: list, batch: int, batches: int, workers: int, collate) -> float:
    """items/s reaching the main process through a DataLoader with `workers` workers (after its first batch)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(EncodedItems(items, batch * (batches + 1)), batch_size=batch, num_workers=workers,
                        collate_fn=collate)
    it = iter(loader)
    next(it)  # workers started, queues filled
    t = time.perf_counter()
    n = sum(len(b[1]) for b in it)
    return n / (time.perf_counter() - t)


def decode_rates(root: Path, n: int, batch: int, batches: int, device: torch.device) -> dict[str, float]:
    """The decode_on_device path: worker img/s per core (bytes + crop draw); DataLoader items/s with 2 workers,
    packed batches and the old per-image lists; device img/s of the batched decode + crop + resize + flip over
    `batches` batches (any device: the CPU runs the same code, for a quick check)."""
    from mae_lite.data.gpu_decode import DeviceDecodeCrop, collate_encoded, decode_batch

    ds = build_dataset(f"folder:{root}", ".", "train", DeviceDecodeCrop(224))
    rates = {"worker": per_core(ds, n, ordered=False)}
    items = [ds[i % len(ds)] for i in range(batch)]
    rates["loader_packed"] = loader_rate(items, batch, batches, 2, collate_encoded)
    rates["loader_list"] = loader_rate(items, batch, batches, 2, collate_list)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    # a few distinct batches (other crops of the same files) cycled: the work of `batches`, not their memory
    packed = [collate_encoded([ds[(k * batch + i) % len(ds)] for i in range(batch)])[0]
              for k in range(min(batches, 4))]
    decode_batch(packed[0], device)  # warm-up (nvJPEG handles, kernels)
    sync(device)
    t = time.perf_counter()
    for k in range(batches):
        decode_batch(packed[k % len(packed)], device)
    sync(device)
    rates["device"] = batches * batch / (time.perf_counter() - t)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=260, help="JPEG files to build (default 260)")
    p.add_argument("--per-row", type=int, default=300, help="images timed per row and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--device", default="cpu", help="cpu; cuda to add the decode_on_device rows (GPU decode); "
                   "cpu-decode for the same rows with the decode on the CPU (a quick check of the code)")
    p.add_argument("--batch", type=int, default=256, help="decode_on_device batch")
    p.add_argument("--decode-batches", type=int, default=20,
                   help="batches timed by the device decode and loader rows (default 20)")
    p.add_argument("--no-shards", action="store_true", help="skip the shard rows")
    p.add_argument("--folder", default=None, help="time these class-per-folder images instead of building the set")
    p.add_argument("--out", default="benchmarks/results/data_speed.json")
    args = p.parse_args()

    torch.set_num_threads(1)  # one loader worker's share of the machine
    random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder) if args.folder else Path(tmp) / "images"
        mean_bytes = make_images(root, args.images) if not args.folder else float("nan")
        tf = pretrain_transform(224, (0.08, 1.0), (3 / 4, 4 / 3), "random", 0.5, IMAGENET_MEAN, IMAGENET_STD,
                                output="uint8")
        rows = {"anchor: torchvision ImageFolder + MAE transform (float32)": (anchor_dataset(root), False),
                "ours: folder (uint8)": (build_dataset(f"folder:{root}", ".", "train", tf), False)}
        if not args.no_shards:
            from mae_lite.data import write_shards

            for label, side in (("ours: shards as-is (uint8)", None), (f"ours: shards --max-side {args.max_side} (uint8)",
                                                                       args.max_side)):
                out = Path(tmp) / f"shards_{side}"
                write_shards(f"folder:{root}", out, max_side=side, progress=False, log=lambda s: None)
                rows[label] = (build_dataset(f"wds:{out}", ".", "train", tf), True)
        rates: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.rounds):
            for label, (ds, ordered) in rows.items():
                rates[label].append(per_core(ds, args.per_row, ordered))
        dec = None
        if args.device != "cpu":
            device = torch.device("cpu" if args.device == "cpu-decode" else args.device)
            dec = decode_rates(root, args.per_row, args.batch, args.decode_batches, device)
    anchor = statistics.median(next(iter(rates.values())))
    what = args.folder or f"{args.images} JPEGs 500x375/375x500 q90 from the embedded photos"
    print(f"{what}, mean {mean_bytes / 1024:.1f} KiB; 224 px; 1 thread; {available_cores()} cores ({cpu_model()}); median of {args.rounds} rounds")
    print(f"| {'path':<58} | img/s per core | vs anchor |")
    table = []
    for label, r in rates.items():
        med = statistics.median(r)
        table.append({"path": label, "img_per_s_per_core": med, "vs_anchor": med / anchor, "rounds": r})
        print(f"| {label:<58} | {med:14.0f} | {med / anchor:8.2f}x |")
    if dec is not None:
        on = "cpu, 1 thread" if args.device == "cpu-decode" else args.device
        rows_dec = [("decode_on_device: workers read bytes + draw crops", "img_per_s_per_core", dec["worker"]),
                    ("decode_on_device: loader, 2 workers, packed batches", "items_per_s_main", dec["loader_packed"]),
                    ("decode_on_device: loader, 2 workers, per-image lists", "items_per_s_main", dec["loader_list"]),
                    (f"decode_on_device: decode + crop + flip on {on}", "img_per_s_device", dec["device"])]
        for label, key, value in rows_dec:
            row = {"path": label, key: value, "batch": args.batch}
            if key == "img_per_s_per_core":
                row["vs_anchor"] = value / anchor
            table.append(row)
            unit = {"img_per_s_per_core": "", "items_per_s_main": " (items/s reaching the main process)",
                    "img_per_s_device": " (img/s of the device)"}[key]
            ratio = f"{value / anchor:8.2f}x" if key == "img_per_s_per_core" else " " * 9
            print(f"| {label:<58} | {value:14.0f} | {ratio} |{unit}")
    result = {"images": args.images, "mean_file_bytes": mean_bytes, "img_size": 224, "rows": table,
              "photos": args.folder or "mae_lite/data/demo/*.jpg", "cores": available_cores(), "cpu_model": cpu_model(),
              "torch": torch.__version__, "mae_lite": mae_lite.__version__,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
