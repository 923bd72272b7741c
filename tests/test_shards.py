"""WebDataset shards: ssl_prepare (round trip, re-encoding, the data sets of ours, atomic writing under SIGKILL,
resume) and dataset=wds: (exact splits over 2 gloo processes x 2 loader workers, seeded per-epoch shuffling,
mid-epoch start, evaluation counting every image once, one-line errors, a one-epoch ssl_train run)."""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_lite.cli.prepare import main as ssl_prepare
from mae_lite.cli.train import main as ssl_train
from mae_lite.data import build_dataset, fashion_mnist
from mae_lite.data.shard_writer import RawSource, write_shards
from mae_lite.data.shards import INDEX_NAME, PARTIAL_NAME, epoch_plan, read_shard
from mae_lite.engine.checkpoint import load_checkpoint
from mae_lite.engine.dist import free_port
from mae_lite.errors import UserError
from mae_lite.data.bad_images import collate
from mae_lite.recipes import FinetuneMAE, MaeLite
from _proc import cli_env
from test_fashion_mnist import TRAIN_LABELS, _write_split
from test_transfer import write_cifar10, write_flowers

N_IDS = 37  # images whose single pixel value is their id (and whose class is their id)


def _jpeg_folder(root: Path, sizes=((40, 30), (20, 24), (64, 16), (33, 33)), classes=("a", "b")) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        for i, (w, h) in enumerate(sizes):
            path = root / c / f"{c}{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    return root


def _samples(out: Path) -> list[dict]:
    index = json.loads((out / INDEX_NAME).read_text())
    return [s for e in index["shards"] for s in read_shard(str(out / e["name"]))]


def _id_source() -> RawSource:
    return RawSource("ids", [str(i) for i in range(N_IDS)], N_IDS,
                     lambda i: (np.full((2, 2), i, np.uint8), i, f"id{i}"))


def id_transform(img: Image.Image) -> torch.Tensor:
    """[id, two random numbers]: the image's id (its pixel value) and draws from torch's and Python's streams."""
    return torch.tensor([float(np.asarray(img)[0, 0, 0]), torch.rand(()).item(), random.random()])


# ----- ssl_prepare -------------------------------------------------------------------------------------
def test_round_trip_keeps_jpeg_bytes_and_labels_and_max_side_shrinks(tmp_path):
    src = _jpeg_folder(tmp_path / "src")
    assert ssl_prepare(["--src", str(src), "--out", str(tmp_path / "as_is"), "--shard-size", "3", "--no-progress"]) == 0
    samples = _samples(tmp_path / "as_is")
    assert len(samples) == 8 and len({s["__key__"] for s in samples}) == 8
    for s in samples:  # the very file bytes and the ImageFolder class index
        rel = s["src.txt"].decode()
        assert s["jpg"] == (src / rel).read_bytes() and int(s["cls"]) == "ab".index(rel[0])
    index = json.loads((tmp_path / "as_is" / INDEX_NAME).read_text())
    assert index["classes"] == ["a", "b"] and [e["samples"] for e in index["shards"]] == [3, 3, 2]
    assert index["made"]["options"]["max_side"] is None and index["made"]["webdataset"] == "1.0.2"

    assert ssl_prepare(["--src", str(src), "--out", str(tmp_path / "small"), "--max-side", "32", "--no-progress"]) == 0
    for s in _samples(tmp_path / "small"):
        rel, data = s["src.txt"].decode(), s["jpg"]
        w, h = Image.open(src / rel).size
        got = Image.open(io.BytesIO(data)).size
        if max(w, h) <= 32:  # small enough: kept as it was
            assert data == (src / rel).read_bytes()
        else:  # longest side 32, aspect kept
            assert max(got) == 32 and abs(got[0] / got[1] - w / h) < 0.1
    ds = build_dataset(f"wds:{tmp_path / 'small'}", "unused", "train", None)
    assert len(ds) == 8 and ds.classes == ["a", "b"] and ds[0][0].mode == "RGB"


def test_fashion_mnist_cifar_and_flowers_through_ssl_prepare(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    root = tmp_path / "data"
    _write_split(root / "fashion_mnist", train=True)
    write_cifar10(root)
    flowers = write_flowers(root)
    for spec, split in (("FashionMNIST", "train"), ("CIFAR10", "eval"), ("Flowers", "train")):
        out = tmp_path / spec
        assert ssl_prepare(["--src", spec, "--split", split, "--data-root", str(root), "--out", str(out),
                            "--format", "png", "--keep-order", "--no-progress"]) == 0
        source = build_dataset(spec, str(root), split, None)
        shards = build_dataset(f"wds:{out}", "unused", split, None)
        assert len(shards) == len(source) and shards.classes == [str(c) for c in source.classes]
        for i in range(len(source)):  # PNG: the very pixels, the same labels
            (a, la), (b, lb) = source[i], shards[i]
            assert la == lb and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b))
    assert [int(s["cls"]) for s in _samples(tmp_path / "FashionMNIST")] == TRAIN_LABELS
    flower_files = sorted(p.read_bytes() for p in (flowers / "jpg").glob("*.jpg"))
    assert all(s["jpg"] in flower_files for s in _samples(tmp_path / "Flowers"))  # JPEG files: kept as they are


def test_killed_mid_shard_leaves_no_broken_shard_and_resumes_to_the_same_shards(tmp_path):
    src = _jpeg_folder(tmp_path / "src", sizes=((20, 20),) * 4, classes=("a", "b", "c"))
    fifo = src / "b" / "b3.jpg"  # position 7 in source order: shard 2 (size 3) has one image written, then blocks
    real = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mae_lite.cli.prepare", "--src", str(src), "--out", str(out), "--shard-size", "3",
           "--keep-order", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fd, deadline = None, time.time() + 120
    try:
        while fd is None and time.time() < deadline:  # opens once ssl_prepare is reading the fifo
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.05)
        assert fd is not None
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if fd is not None:
            os.close(fd)
    assert proc.returncode == -signal.SIGKILL
    finals = sorted(p.name for p in out.glob("shard-*.tar"))
    assert finals == ["shard-000000.tar", "shard-000001.tar"]  # only complete shards under final names
    assert all(len(list(read_shard(str(out / n)))) == 3 for n in finals)
    assert len(list(out.glob(".shard-000002.tar.*.tmp"))) == 1 and not (out / INDEX_NAME).exists()
    partial = json.loads((out / PARTIAL_NAME).read_text())
    assert [e["name"] for e in partial["shards"]] == finals
    with pytest.raises(UserError, match="unfinished ssl_prepare run"):
        build_dataset(f"wds:{out}", "unused", "train", None)

    fifo.unlink()
    fifo.write_bytes(real)
    args = ["--src", str(src), "--shard-size", "3", "--keep-order", "--workers", "1", "--no-progress"]
    assert ssl_prepare([*args, "--out", str(out)]) == 0  # resumes: shards 2 and 3
    assert ssl_prepare([*args, "--out", str(tmp_path / "clean")]) == 0
    resumed, clean = (json.loads((d / INDEX_NAME).read_text()) for d in (out, tmp_path / "clean"))
    assert resumed["shards"] == clean["shards"] and resumed["made"]["options"] == clean["made"]["options"]
    assert resumed["num_samples"] == 12 and not list(out.glob(".*.tmp")) and not (out / PARTIAL_NAME).exists()
    for e in clean["shards"]:  # byte for byte
        assert (out / e["name"]).read_bytes() == (tmp_path / "clean" / e["name"]).read_bytes()
    with pytest.raises(UserError, match="other options"):
        write_shards(str(src), out, shard_size=4, progress=False)


def test_missing_and_broken_shard_specs_are_one_line(tmp_path):
    write_shards(_id_source(), tmp_path / "ok", shard_size=10, image_format="png", progress=False)
    (tmp_path / "empty").mkdir()
    cases = {f"wds:{tmp_path / 'nope'}": "ssl_prepare", f"wds:{tmp_path / 'empty'}": "no index.json",
             f"wds:{tmp_path / 'ok'}/part-{{0..3}}.tar": "matches no shard", "wds:": "ssl_prepare"}
    for spec, needle in cases.items():
        with pytest.raises(UserError) as e:
            build_dataset(spec, "unused", "train", None)
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert len(build_dataset(f"wds:{tmp_path / 'ok'}/shard-{{000000..000001}}.tar", "", "train", None)) == 20
    shard = tmp_path / "ok" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])  # a partial copy
    with pytest.raises(UserError, match="incomplete copy"):
        build_dataset(f"wds:{tmp_path / 'ok'}", "unused", "train", None)
    shard.unlink()
    with pytest.raises(UserError, match="missing"):
        build_dataset(f"wds:{tmp_path / 'ok'}", "unused", "train", None)


# ----- reading -----------------------------------------------------------------------------------------
def _ids(batches) -> list[int]:
    return [int(v) for b, _ in batches for v in b[:, 0]]


def test_plan_equal_batches_disjoint_and_eval_exactly_once():
    counts = [7, 0, 12, 5, 9]  # uneven shards, one empty
    for epoch in range(3):
        seen = []
        for rank in range(3):
            plan = epoch_plan(counts, world=3, rank=rank, workers=2, batch=4, train=True, seed=1, epoch=epoch)
            assert sum(n for _, n in plan) == 33 // 12  # the same on every rank
            seen += [(s.shard, i) for segs, _ in plan for s in segs for i in range(s.start, s.stop)]
        assert len(seen) == len(set(seen)) == 3 * 2 * 4
    seen = [(s.shard, i) for r in range(3) for segs, _ in epoch_plan(counts, world=3, rank=r, workers=2, batch=4,
                                                                      train=False, seed=0, epoch=0)
            for s in segs for i in range(s.start, s.stop)]
    assert sorted(seen) == [(k, i) for k, n in enumerate(counts) for i in range(n)]


def test_seeded_per_epoch_order_and_mid_epoch_start(tmp_path):
    write_shards(_id_source(), tmp_path / "s", shard_size=5, image_format="png", progress=False)
    torch.manual_seed(3)
    ds = build_dataset(f"wds:{tmp_path / 's'}", "", "train", id_transform)
    ds.shuffle_buffer = 8

    def epoch(loader, e, start=0):
        loader.set_epoch(e)
        loader.set_start(start)
        return list(loader)

    loader = ds.make_loader(4, 2, True)
    assert len(loader) == 9 and pickle.loads(pickle.dumps(loader.stream)).ds.shards == ds.shards  # spawn-safe
    e0, e1 = epoch(loader, 0), epoch(loader, 1)
    assert len(e0) == len(e1) == 9 and len(set(_ids(e0))) == 36
    assert _ids(e0) != _ids(e1) and _ids(epoch(loader, 0)) == _ids(e0)  # per-epoch order, reproducible
    rest = epoch(loader, 1, start=3)  # a mid-epoch resume: exactly the rest, augmentation draws included
    assert len(rest) == 6 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, e1[3:]))
    state = torch.get_rng_state()  # without workers the batches come from this process: its stream is left alone
    in_process = epoch(ds.make_loader(4, 0, True), 1)
    assert torch.equal(torch.get_rng_state(), state) and sorted(_ids(in_process)) != _ids(in_process)
    assert len(set(_ids(in_process))) == 36
    torch.manual_seed(4)  # another seed: another order
    other = build_dataset(f"wds:{tmp_path / 's'}", "", "train", id_transform)
    other.shuffle_buffer = 8
    assert _ids(epoch(other.make_loader(4, 2, True), 0)) != _ids(e0)


def _two_rank_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    from mae_lite.engine.dist import init_process
    from mae_lite.engine.evaluate import eval_loader, evaluate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = init_process(rank, world, 0, "cpu")
    torch.manual_seed(11 + rank)  # as the loop seeds each rank (seed + rank)
    ds = build_dataset(f"wds:{folder}", "", "train", id_transform)
    ds.shuffle_buffer = 6
    loader = ds.make_loader(4, 2, True, None, False, env)
    result = {"len": len(loader), "epochs": []}
    for e in range(2):
        loader.set_epoch(e)
        result["epochs"].append([b[0].tolist() for b in loader])
    loader.set_epoch(1)
    loader.set_start(2)
    result["rest"] = [b[0].tolist() for b in loader]
    val = eval_loader(build_dataset(f"wds:{folder}", "", "eval", id_transform), 4, env, 2)
    result["eval"] = _ids(list(val))

    class FirstTen(torch.nn.Module):  # right on images 0..9 only
        def forward(self, x):
            ids = x[:, 0].long()
            return torch.nn.functional.one_hot(torch.where(ids < 10, ids, (ids + 1) % N_IDS), N_IDS).float()

    result["top1"] = evaluate(FirstTen(), val, env)[0]
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_two_processes_two_workers_exact_counts(tmp_path):
    write_shards(_id_source(), tmp_path / "s", shard_size=6, image_format="png", progress=False)
    # forked ranks (ssl_train spawns them; the loader forks its workers either way), so no test re-imports torch
    torch.multiprocessing.start_processes(_two_rank_worker, args=(2, free_port(), str(tmp_path / "s"), str(tmp_path)),
                                          nprocs=2, start_method="fork")
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert r[0]["len"] == r[1]["len"] == 37 // 8 == 4
    orders = []
    for e in range(2):
        per_rank = [[int(row[0]) for b in r[k]["epochs"][e] for row in b] for k in range(2)]
        assert [len(p) for p in per_rank] == [16, 16]  # equal batches on each rank, full ones
        both = per_rank[0] + per_rank[1]
        assert len(set(both)) == 32  # no image twice in an epoch (5 of 37 dropped to equalise)
        orders.append(both)
    assert orders[0] != orders[1]
    for k in range(2):  # mid-epoch start on each rank: the rest of that rank's epoch, random draws included
        assert r[k]["rest"] == r[k]["epochs"][1][2:]
    assert sorted(r[0]["eval"] + r[1]["eval"]) == list(range(N_IDS))  # every image exactly once
    assert r[0]["top1"] == pytest.approx(100 * 10 / N_IDS)


def test_a_bad_image_in_a_shard_is_skipped_and_named(tmp_path):
    src = _jpeg_folder(tmp_path / "src", sizes=((20, 20),) * 2)
    (src / "b" / "b1.jpg").write_bytes((src / "b" / "b1.jpg").read_bytes()[:60])  # truncated: kept as it is
    write_shards(str(src), tmp_path / "s", progress=False)
    ds = build_dataset(f"wds:{tmp_path / 's'}", "", "train", lambda img: torch.zeros(1))
    batches = list(ds.make_loader(4, 0, True, collate))
    bad = [b for batch in batches if len(batch) == 3 for b in batch[2]]
    assert len(batches) == 1 and len(bad) == 1 and "b/b1.jpg" in bad[0].path and len(batches[0][0]) == 4


def test_train_and_val_shard_folders_serve_fine_tuning(tmp_path):
    src = _jpeg_folder(tmp_path / "src", sizes=((24, 24),) * 3)
    write_shards(str(src), tmp_path / "wds" / "train", progress=False)
    write_shards(_id_source(), tmp_path / "wds" / "val", image_format="png", progress=False)
    data = FinetuneMAE(dataset=f"wds:{tmp_path / 'wds'}", img_size=32, patch_size=4, eval_limit=5).build_datasets()
    assert len(data["train"]) == 6 and len(data["eval"]) == 5 and data["train"].classes == ["a", "b"]
    with pytest.raises(UserError, match="no val/"):
        (tmp_path / "wds" / "val" / INDEX_NAME).unlink()
        build_dataset(f"wds:{tmp_path / 'wds'}", "", "eval", None)


def test_limits_and_a_one_epoch_ssl_train_run(tmp_path):
    src = _jpeg_folder(tmp_path / "src", sizes=((48, 40),) * 3)
    assert ssl_prepare(["--src", str(src), "--out", str(tmp_path / "wds"), "--shard-size", "4", "--no-progress"]) == 0
    spec = f"wds:{tmp_path / 'wds'}"
    recipe = MaeLite(dataset=spec, img_size=32, patch_size=4, train_limit=5)
    assert len(recipe.build_datasets()["train"]) == 5
    code = ssl_train(["-d", "cpu", "-f", "mae_lite", "-b", "4", "-e", "1", "--exp-options", f"dataset={spec}",
                      f"output_dir={tmp_path}", "exp_name=wds", "img_size=32", "patch_size=4", "depth=2",
                      "num_workers=2", "enable_tensorboard=False", "vis_images=0", "print_interval=1"])
    assert code == 0
    ckpt = load_checkpoint(tmp_path / "wds" / "last_epoch_ckpt.pth.tar")
    assert ckpt["start_epoch"] == 1 and ckpt["iters_per_epoch"] == 6 // 4


class _SigtermAt:
    """The recipe's transform, with a SIGTERM to this process at its `at`-th call (workers=0: the batches are made
    in the training process)."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.calls = inner, at, 0

    def __call__(self, img):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner(img)


class _CutMaeLite(MaeLite):
    def build_datasets(self):
        data = super().build_datasets()
        data["train"].transform = _SigtermAt(data["train"].transform, 8 + 2)  # epoch 2, batch 1 of 2
        return data


def test_mid_epoch_resume_on_shards_is_bit_identical(tmp_path):
    from mae_lite.engine.dist import DistEnv
    from mae_lite.engine.loop import train
    from mae_lite.errors import Stopped

    src = _jpeg_folder(tmp_path / "src", sizes=((40, 36),) * 4)
    write_shards(str(src), tmp_path / "wds", shard_size=3, progress=False)
    opts = dict(dataset=f"wds:{tmp_path / 'wds'}", img_size=32, patch_size=4, depth=2, batch_size=4, max_epoch=2,
                num_workers=0, vis_images=0, print_interval=1, dump_interval=1, enable_tensorboard=False,
                output_dir=str(tmp_path), warmup_epochs=0)
    train(MaeLite(**opts, exp_name="straight"), DistEnv())
    with pytest.raises(Stopped, match="epoch 2, iteration 1"):
        train(_CutMaeLite(**opts, exp_name="cut"), DistEnv())
    ckpt = load_checkpoint(tmp_path / "cut" / "last_epoch_ckpt.pth.tar")
    assert (ckpt["start_epoch"], ckpt["iteration"], ckpt["iters_per_epoch"]) == (1, 1, 2)
    train(MaeLite(**opts, exp_name="cut"), DistEnv(), resume_requested=True)
    a = load_checkpoint(tmp_path / "straight" / "last_epoch_ckpt.pth.tar")["model"]
    b = load_checkpoint(tmp_path / "cut" / "last_epoch_ckpt.pth.tar")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
