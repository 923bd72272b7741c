"""Decoded + augmented training images per second per CPU core, on ImageNet-like JPEGs: torchvision ImageFolder +
facebookresearch/mae's pre-training transform (the anchor) next to our paths, in one run.

    python benchmarks/data_speed.py                      # CPU rows
    python benchmarks/data_speed.py --device cuda        # + the GPU decode path (decode_on_device)
    python benchmarks/data_speed.py --folder /data/imagenet/imagenet_train --no-shards   # your own images

The images: the photos embedded in the package (mae_lite/data/demo/*.jpg, scikit-image's data photos and NASA
images, see their LICENSES.md) resized to 500x375 or 375x500 (alternately) and saved at JPEG quality 90, copied
to --images files in 10 class folders. Rows, each in one process with torch.set_num_threads(1) (one loader worker's
share: a host with N cores delivers about N times the figure):

- anchor: torchvision ImageFolder + RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3), RandomHorizontalFlip,
  ToTensor, Normalize (float32 out), as MAE's main_pretrain.py;
- folder: our `folder:` dataset + the mae_lite recipe's transform (uint8 out; normalisation runs on the device);
- shards: ssl_prepare's shards of the same images, as they are and re-encoded at --max-side 320;
- cuda (with --device cuda): workers only read bytes and draw crops (per core), then the device decodes and crops
  whole batches (img/s of the GPU, batch --batch).

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
from pathlib import Path

import torch
from PIL import Image

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


def cuda_rates(root: Path, n: int, batch: int, device: torch.device) -> tuple[float, float]:
    """(worker img/s per core: bytes + crop draw, device img/s: batched decode + crop + resize + flip)."""
    from mae_lite.data.gpu_decode import DeviceDecodeCrop, collate_encoded, decode_batch

    ds = build_dataset(f"folder:{root}", ".", "train", DeviceDecodeCrop(224))
    worker = per_core(ds, n, ordered=False)
    items = [ds[i % len(ds)] for i in range(batch)]
    images, _ = collate_encoded(items)
    decode_batch(images, device)  # warm-up (nvJPEG handles, kernels)
    torch.cuda.synchronize(device)
    reps = max(1, n // batch)
    t = time.perf_counter()
    for _ in range(reps):
        out, _ = decode_batch(images, device)
    torch.cuda.synchronize(device)
    return worker, reps * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=260, help="JPEG files to build (default 260)")
    p.add_argument("--per-row", type=int, default=300, help="images timed per row and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--device", default="cpu", help="cpu, or cuda to add the GPU decode row")
    p.add_argument("--batch", type=int, default=256, help="GPU decode batch")
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
        cuda = None
        if args.device.startswith("cuda"):
            cuda = cuda_rates(root, args.per_row, args.batch, torch.device(args.device))
    anchor = statistics.median(next(iter(rates.values())))
    what = args.folder or f"{args.images} JPEGs 500x375/375x500 q90 from the embedded photos"
    print(f"{what}, mean {mean_bytes / 1024:.1f} KiB; 224 px; 1 thread; {available_cores()} cores ({cpu_model()}); median of {args.rounds} rounds")
    print(f"| {'path':<58} | img/s per core | vs anchor |")
    table = []
    for label, r in rates.items():
        med = statistics.median(r)
        table.append({"path": label, "img_per_s_per_core": med, "vs_anchor": med / anchor, "rounds": r})
        print(f"| {label:<58} | {med:14.0f} | {med / anchor:8.2f}x |")
    if cuda is not None:
        table.append({"path": "cuda: workers read bytes + draw crops", "img_per_s_per_core": cuda[0],
                      "vs_anchor": cuda[0] / anchor})
        table.append({"path": f"cuda: batched decode_jpeg + crop/resize/flip on {args.device}", "img_per_s_gpu": cuda[1]})
        print(f"| {'cuda: workers read bytes + draw crops':<58} | {cuda[0]:14.0f} | {cuda[0] / anchor:8.2f}x |")
        print(f"| {'cuda: device decode + crop (img/s of the GPU)':<58} | {cuda[1]:14.0f} |           |")
    result = {"images": args.images, "mean_file_bytes": mean_bytes, "img_size": 224, "rows": table,
              "photos": args.folder or "mae_lite/data/demo/*.jpg", "cores": available_cores(), "cpu_model": cpu_model(),
              "torch": torch.__version__, "mae_lite": mae_lite.__version__,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
