"""The fast decode path (data/decode.py), the device decode path (data/gpu_decode.py) and the rank-0 folder scan:
the crop distribution is torchvision's, the uint8 path normalised on the device equals the float path, DCT-scaled
decoding stays close to a full decode, the device path gives the CPU path's crops."""
from __future__ import annotations

import io
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F

from mae_lite.data.decode import FastRandomResizedCrop, ResizeCenterCrop, crop_resize, decode, sample_crop, scaled_box
from mae_lite.data.demo import DEMO_DIR
from mae_lite.data.gpu_decode import DeviceDecodeCrop, EncodedBatch, EncodedImage, collate_encoded, decode_batch
from mae_lite.data.transforms import eval_transform
from mae_lite.recipes.base import IMAGENET_MEAN, IMAGENET_STD

CPU = torch.device("cpu")
LEVEL = 1.0 / 255 / min(IMAGENET_STD)  # one uint8 level after normalisation
TV = {"bilinear": F.InterpolationMode.BILINEAR, "bicubic": F.InterpolationMode.BICUBIC}


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    """A real photo as an ImageNet-like 500x375 JPEG (q90), and a 1000x750 one (DCT scaling at 224 px)."""
    d = tmp_path_factory.mktemp("jpeg")
    src = Image.open(DEMO_DIR / "astronaut.jpg").convert("RGB")
    for name, size in (("a.jpg", (500, 375)), ("big.jpg", (1000, 750))):
        src.resize(size, Image.BICUBIC).save(d / name, quality=90)
    return d


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def test_crop_statistics_match_torchvision_get_params():
    n, (W, H) = 4000, (500, 375)
    rng = random.Random(0)
    ours = np.array([sample_crop(W, H, (0.08, 1.0), (3 / 4, 4 / 3), rng) for _ in range(n)], dtype=float)
    torch.manual_seed(0)
    img = Image.new("RGB", (W, H))
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], dtype=float)
    for name, f in {"area fraction": lambda p: p[:, 2] * p[:, 3] / (W * H),
                    "log aspect ratio": lambda p: np.log(p[:, 3] / p[:, 2]),
                    "centre x": lambda p: (p[:, 1] + p[:, 3] / 2) / W,
                    "centre y": lambda p: (p[:, 0] + p[:, 2] / 2) / H}.items():
        d = ks(f(ours), f(ref))
        assert d < 0.04, (name, d)  # the 1 % critical value at 4000 + 4000 draws is 0.036
    other = np.array([sample_crop(W, H, (0.2, 1.0), (3 / 4, 4 / 3), rng) for _ in range(n)], dtype=float)
    assert ks(other[:, 2] * other[:, 3] / (W * H), ours[:, 2] * ours[:, 3] / (W * H)) > 0.1  # MAE's scale: detected
    # boxes lie inside the image; the log ratio stays within log(3/4)..log(4/3) (up to rounding to whole pixels)
    assert (ours[:, 0] + ours[:, 2] <= H).all() and (ours[:, 1] + ours[:, 3] <= W).all()
    assert np.abs(np.log(ours[:, 3] / ours[:, 2])).max() < math.log(4 / 3) + 0.02


def test_flip_and_interpolation_draws():
    random.seed(1)
    t = FastRandomResizedCrop(32)
    draws = [t.params(500, 375) for _ in range(2000)]
    assert abs(np.mean([d[4] for d in draws]) - 0.5) < 0.05
    assert abs(np.mean([d[5] == "bicubic" for d in draws]) - 0.5) < 0.05
    assert not any(d[4] for d in (FastRandomResizedCrop(32, hflip=0.0).params(50, 50) for _ in range(50)))


def test_uint8_path_normalised_on_device_equals_float_path(jpeg):
    from mae_lite.recipes.mae_lite import MaeLite

    recipe = MaeLite(dataset="demo", img_size=64, patch_size=8)
    u8, fl = (FastRandomResizedCrop(64, output=o) for o in ("uint8", "float"))
    random.seed(3)
    batch = torch.stack([u8(Image.open(jpeg / "a.jpg")) for _ in range(6)])
    random.seed(3)
    expected = torch.stack([fl(Image.open(jpeg / "a.jpg")) for _ in range(6)])
    assert batch.dtype == torch.uint8 and expected.dtype == torch.float32
    images, _ = recipe.device_batch((batch, torch.zeros(6, dtype=torch.long)), CPU)
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)


def test_fast_crop_matches_torchvision_on_the_same_box(jpeg):
    """Today's pipeline (PIL crop + resize, ToTensor, Normalize) and ours at the same parameters: within one level."""
    random.seed(5)
    t = FastRandomResizedCrop(96, draft=False)
    for _ in range(6):
        ours = t(Image.open(jpeg / "a.jpg")).float()
        top, left, h, w, flip, interp = t.last_params
        ref = F.resized_crop(Image.open(jpeg / "a.jpg").convert("RGB"), top, left, h, w, [96, 96], TV[interp])
        ref = F.pil_to_tensor(F.hflip(ref) if flip else ref).float()
        assert (ours - ref).abs().max() <= 2 and (ours - ref).abs().mean() < 0.1, t.last_params


def test_eval_uint8_matches_torchvision_eval_transform(jpeg):
    from mae_lite.data.decode import to_float_normalised

    old = eval_transform(64, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD)  # Resize + CenterCrop + ToTensor + Normalize
    new = eval_transform(64, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD, output="uint8")
    assert isinstance(new, ResizeCenterCrop)
    full = ResizeCenterCrop(64, 0.875, "bicubic", draft=False)
    ref = old(Image.open(jpeg / "a.jpg").convert("RGB"))
    for t, tol in ((full, 0.2), (new, 4.0)):  # a full decode; decoded at 1/4 (500x375 -> 97x73 is under a quarter)
        x = t(Image.open(jpeg / "a.jpg"))
        assert x.dtype == torch.uint8 and x.shape == (3, 64, 64)
        diff = (to_float_normalised(x, IMAGENET_MEAN, IMAGENET_STD) - ref).abs()
        assert diff.mean() < tol * LEVEL, (t.draft, diff.mean() / LEVEL)


def test_dct_scaled_decode_is_used_only_when_the_crop_allows_and_stays_close(jpeg):
    full, f1 = decode(Image.open(jpeg / "big.jpg"), 1)
    assert f1 == 1.0 and full.shape == (3, 750, 1000)
    small, f = decode(Image.open(jpeg / "big.jpg"), 2)
    assert f == 2.0 and small.shape == (3, 375, 500)
    box = (30, 60, 600, 800)  # top, left, h, w: >= 2 x 224 both ways, so 1/2 is allowed
    t = FastRandomResizedCrop(224)
    x = t.apply(Image.open(jpeg / "big.jpg"), (*box, False, "bicubic"))
    eff = tuple(int(v * 2) for v in scaled_box(box, 2.0, small))  # the box actually cut, in original pixels
    assert max(abs(a - b) for a, b in zip(eff, box)) <= 1
    ref = crop_resize(full, eff, 224, "bicubic")
    diff = (x.float() - ref.float()).abs()
    assert diff.mean() < 3.0, diff.mean()  # DCT scaling vs an antialiased resize of the full decode
    # a crop under 2 x 224 on one side: decoded at full size, identical to the no-draft path
    narrow = (0, 0, 400, 900)
    a = t.apply(Image.open(jpeg / "big.jpg"), (*narrow, True, "bilinear"))
    b = FastRandomResizedCrop(224, draft=False).apply(Image.open(jpeg / "big.jpg"), (*narrow, True, "bilinear"))
    assert torch.equal(a, b)


def test_device_decode_path_gives_the_cpu_paths_crops(jpeg, tmp_path):
    """decode_on_device: workers give bytes + the drawn box; decode_batch (here on the CPU, the same code on CUDA)
    decodes the list in one call and crops; a PNG in the batch takes the CPU path. Same boxes, close pixels."""
    Image.open(jpeg / "a.jpg").convert("RGB").save(tmp_path / "p.png")
    dev = DeviceDecodeCrop(64, interpolation="bicubic")
    cpu = FastRandomResizedCrop(64, interpolation="bicubic", draft=False)
    random.seed(7)
    items, params = [], []
    for name in ("a.jpg", "a.jpg", "p.png", "big.jpg"):
        folder = tmp_path if name.endswith(".png") else jpeg
        items.append((dev(Image.open(folder / name)), 0))
        params.append((folder / name, dev.last_params))
    assert [type(i[0]).__name__ for i in items] == ["EncodedImage", "EncodedImage", "Tensor", "EncodedImage"]
    assert items[0][0].box == params[0][1][:4] and items[0][0].source.endswith("a.jpg")
    images, target = collate_encoded(items)
    out, bad = decode_batch(images, CPU)
    assert bad == [] and out.shape == (4, 3, 64, 64) and out.dtype == torch.uint8
    for k, (path, p) in enumerate(params):
        ref = cpu.apply(Image.open(path), p).float()
        assert (out[k].float() - ref).abs().mean() < 1.0, (k, (out[k].float() - ref).abs().mean())
    # a truncated JPEG: listed as bad, its slot filled with another image of the batch
    data = (jpeg / "a.jpg").read_bytes()
    broken = EncodedImage(torch.frombuffer(bytearray(data[: len(data) // 3]), dtype=torch.uint8), (0, 0, 100, 100),
                          False, "bilinear", 64, "broken.jpg")
    out, bad = decode_batch([items[0][0], broken], CPU)  # a list is packed first
    assert [b.path for b in bad] == ["broken.jpg"] and torch.equal(out[1], out[0])


def test_decode_on_device_recipe_batches(jpeg, tmp_path):
    from torch.utils.data import DataLoader

    from mae_lite.recipes.mae_lite import MaeLite

    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        for i in range(2):
            (tmp_path / c / f"{i}.jpg").write_bytes((jpeg / "a.jpg").read_bytes())
    r = MaeLite(dataset=f"folder:{tmp_path}", img_size=32, patch_size=8, decode_on_device=True, num_workers=0)
    ds = r.build_datasets()["train"]
    loader = DataLoader(ds, batch_size=4, collate_fn=r.collate_fn())
    images, target = r.device_batch(next(iter(loader)), CPU)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and target.tolist() == [0, 0, 1, 1]
    assert -2.2 < float(images.min()) and float(images.max()) < 2.7  # normalised
    from mae_lite.errors import UserError
    from mae_lite.recipes.finetune import Finetune

    with pytest.raises(UserError, match="decode_on_device applies to pre-training"):
        Finetune(pretrain_exp_name="p", decode_on_device=True)


def _mixed_folder(jpeg, root):
    """root/x, root/y: 12 images, JPEGs of different sizes, a PNG and a truncated JPEG (header intact)."""
    src = Image.open(jpeg / "a.jpg").convert("RGB")
    data = (jpeg / "a.jpg").read_bytes()
    for c in ("x", "y"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            src.resize((200 + 40 * i, 150 + 30 * i)).save(root / c / f"{i}.jpg", quality=85)
    src.save(root / "x" / "p.png")
    (root / "y" / "broken.jpg").write_bytes(data[: len(data) // 3])


def storages(obj) -> int:
    """The distinct tensor storages pickling `obj` goes through: each is one shared-memory block (one file
    descriptor) when a loader worker sends it to the main process."""
    seen = set()

    class Counting(pickle.Pickler):
        def persistent_id(self, x):
            if isinstance(x, torch.Tensor):
                seen.add(x.untyped_storage().data_ptr())
                return len(seen)  # stands in for the tensor: its bytes are not what is counted
            return None

    Counting(io.BytesIO()).dump(obj)
    return len(seen)


def test_packed_batch_decodes_as_each_image_alone(jpeg, tmp_path):
    """One EncodedBatch (all the JPEG bytes in one tensor) against decode_jpeg + crop_resize image by image, on a
    batch of JPEGs, a PNG (decoded in the worker) and a truncated JPEG (bad, its slot filled): equal pixels."""
    _mixed_folder(jpeg, tmp_path)
    dev = DeviceDecodeCrop(48)
    random.seed(13)
    names = ["x/0.jpg", "x/p.png", "y/broken.jpg", "x/4.jpg", "y/2.jpg"]
    items = [(dev(Image.open(tmp_path / n)), k) for k, n in enumerate(names)]
    batch, target = collate_encoded(items)
    assert isinstance(batch, EncodedBatch) and len(batch) == 5 and target.tolist() == [0, 1, 2, 3, 4]
    assert batch.offsets.tolist()[-1] == batch.data.numel() == sum(
        x.data.numel() for x, _ in items if isinstance(x, EncodedImage))
    out, bad = decode_batch(batch, CPU)
    assert [b.path for b in bad] == [str(tmp_path / "y/broken.jpg")]
    ref = []
    for x, _ in items:
        if not isinstance(x, EncodedImage):
            ref.append(x)
            continue
        try:
            img = decode_jpeg(x.data, mode=ImageReadMode.RGB)
        except RuntimeError:
            ref.append(None)
            continue
        ref.append(crop_resize(img, x.box, x.size, x.interpolation, x.flip))
    good = [r for r in ref if r is not None]
    ref = [r if r is not None else good[k % len(good)] for k, r in enumerate(ref)]
    assert out.shape == (5, 3, 48, 48) and torch.equal(out, torch.stack(ref))
    assert torch.equal(out[2], out[3])  # the truncated JPEG's slot: a copy of another image of the batch


def test_a_packed_batch_crosses_processes_as_a_few_blocks(jpeg):
    """A batch of 32 JPEGs pickles as 3 tensors (bytes, offsets, labels), not one per image."""
    random.seed(17)
    dev = DeviceDecodeCrop(32)
    items = [(dev(Image.open(jpeg / ("a.jpg" if k % 2 else "big.jpg"))), k % 3) for k in range(32)]
    batch = collate_encoded(items)
    assert storages(batch) == 3
    assert storages(collate_encoded(items[:3] + [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)])) == 4  # + a PNG
    assert batch[0].pin_memory() is batch[0]  # the pin thread leaves the bytes where they are (host decoding)


def test_decode_on_device_with_two_workers_gives_the_same_batches(jpeg, tmp_path):
    """The training loader (make_loader) with 2 workers and with none: the same decoded batches and bad images, and
    each batch reaches the main process as a few shared-memory blocks."""
    from mae_lite.engine.dist import DistEnv
    from mae_lite.engine.loader import make_loader
    from mae_lite.recipes.mae_lite import MaeLite

    _mixed_folder(jpeg, tmp_path)
    runs = {}
    for workers in (0, 2):
        r = MaeLite(dataset=f"folder:{tmp_path}", img_size=32, patch_size=8, decode_on_device=True,
                    num_workers=workers)
        loader = make_loader(r.build_datasets()["train"], 4, DistEnv(), workers, True, r.collate_fn(), seed=3)
        random.seed(0)
        loader.set_epoch(0)
        try:
            raw = list(loader)
        finally:
            loader.close()
        assert len(raw) == 3
        runs[workers] = [r.device_batch(b, CPU) for b in raw], dict(r.bad_images.seen), raw
    (b0, bad0, _), (b2, bad2, raw2) = runs[0], runs[2]
    assert list(bad0) == list(bad2) == [str(tmp_path / "y" / "broken.jpg")]
    for (i0, t0), (i2, t2) in zip(b0, b2):
        assert i0.shape == (4, 3, 32, 32) and torch.equal(i0, i2) and torch.equal(t0, t2)
    for b in raw2:
        images = b[0]
        assert isinstance(images, EncodedBatch) and storages(b) <= 3 + len(images.decoded)


def _two_rank_worker(rank: int, world: int, init: str, root: str, out: str) -> None:
    """Rank r: lists the folder (counting os.scandir calls), then meets some bad images and reports them."""
    import torch.distributed as dist

    from mae_lite.data.bad_images import BadImage
    from mae_lite.engine.dist import DistEnv
    from mae_lite.recipes.mae_lite import MaeLite

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = []
    real = os.scandir

    def counting(path="."):
        calls.append(str(path))
        return real(path)

    os.scandir = counting
    try:
        r = MaeLite(dataset=f"folder:{root}", img_size=16, patch_size=8, max_bad_images=5)
        ds = r.build_datasets()["train"]
        os.scandir = real
        env = DistEnv(rank=rank, world_size=world)
        # epoch 1: rank 0 meets a.jpg and b.jpg, rank 1 b.jpg and c.jpg; epoch 2: rank 1 meets d.jpg
        r.bad_images.add([BadImage(p, "OSError: truncated") for p in [["a.jpg", "b.jpg"], ["b.jpg", "c.jpg"]][rank]],
                         train=True)
        first = r.data_report(env)
        if rank == 1:
            r.bad_images.add([BadImage("d.jpg", "OSError: truncated")], train=True)
        second = r.data_report(env)
        torch.save({"calls": len(calls), "samples": ds.samples, "classes": ds.classes, "first": first,
                    "second": second}, f"{out}/{rank}.pt")
    finally:
        os.scandir = real
        dist.destroy_process_group()


def test_two_ranks_scan_the_folder_once_and_merge_bad_image_counts(tmp_path):
    """2 gloo processes: only rank 0 lists the image folder, both get its samples; bad-image counts are merged
    (a file met on both ranks counts once) and add up over epochs."""
    import torch.multiprocessing as mp

    root = tmp_path / "data"
    for c in ("b", "a"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(root / c / f"{i}.png")
    mp.spawn(_two_rank_worker, args=(2, f"file://{tmp_path}/store", str(root), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{k}.pt", weights_only=False) for k in (0, 1))
    assert r0["calls"] >= 3 and r1["calls"] == 0  # the root and both class folders, on rank 0 only
    assert r0["samples"] == r1["samples"] and len(r1["samples"]) == 6 and r1["classes"] == ["a", "b"]
    for rep in (r0, r1):
        assert (rep["first"]["bad_images"], rep["first"]["bad_images_total"]) == (3, 3)  # a, b, c: b once
        assert (rep["second"]["bad_images"], rep["second"]["bad_images_total"]) == (1, 4)  # d, on both ranks
        assert sorted(rep["second"]["bad_image_files"]) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


@pytest.mark.cuda
def test_device_decode_on_cuda_matches_the_cpu_run(jpeg):
    """nvJPEG + the same crop code on the GPU against the CPU run of decode_batch (same parameters)."""
    random.seed(11)
    dev = DeviceDecodeCrop(224)
    items = [(dev(Image.open(jpeg / n)), 0) for n in ("a.jpg", "big.jpg", "a.jpg")]
    images, _ = collate_encoded(items)
    from torch.utils.data._utils.pin_memory import pin_memory

    # the loader's pin thread: the type kept, the bytes not copied, a worker-decoded item (PNG) pinned
    pinned = pin_memory(collate_encoded(items + [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)]))
    assert isinstance(pinned[0], EncodedBatch) and not pinned[0].data.is_pinned() and pinned[1].is_pinned()
    assert pinned[0].decoded[0].is_pinned()
    on_gpu, bad = decode_batch(images, torch.device("cuda"))
    on_cpu, _ = decode_batch(images, CPU)
    assert bad == [] and on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape == (3, 3, 224, 224)
    assert (on_gpu.cpu().float() - on_cpu.float()).abs().mean() < 1.0
