"""Transfer sets read from tiny fixtures in their published formats, the transfer recipe (fact sheet 4.8),
few_shot, the seed's TRANSFER.md command line, and the ssl_sweep table."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from mae_lite.cli.train import main as ssl_train
from mae_lite.data import build_dataset
from mae_lite.data.transfer_fewshot import few_shot_indices
from mae_lite.engine.checkpoint import load_checkpoint, save_checkpoint
from mae_lite.errors import UserError
from mae_lite.recipes import resolve_recipe
from mae_lite.recipes.transfer import FinetuneTransfer

TINY = ["img_size=32", "patch_size=4", "depth=2", "num_workers=0", "enable_tensorboard=false"]


# ----- fixtures in the published formats -----------------------------------------------------------
def _jpg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 10, 3), value, np.uint8)).save(path)


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_rows(labels: list[int]) -> np.ndarray:
    """uint8 [N, 3072]: R plane 10 + label, G plane 20, B plane 30; pixel (row 0, col 1) has R = 200."""
    rows = np.zeros((len(labels), 3, 32, 32), np.uint8)
    rows[:, 0], rows[:, 1], rows[:, 2] = np.array(labels)[:, None, None] + 10, 20, 30
    rows[:, 0, 0, 1] = 200
    return rows.reshape(len(labels), -1)


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar" / "cifar-10-batches-py"
    for b in range(1, 6):  # 4 images per batch, labels b-1 .. b+2 (mod 10)
        labels = [(b - 1 + i) % 10 for i in range(4)]
        _pickle(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": labels,
                                              "data": _cifar_rows(labels), "filenames": [f"{b}_{i}.png" for i in range(4)]})
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": [9, 0, 3],
                                    "data": _cifar_rows([9, 0, 3]), "filenames": ["a", "b", "c"]})
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 4,
                                      "num_vis": 3072})
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar" / "cifar-100-python"
    fine = [0, 99, 50, 7, 7]
    _pickle(folder / "train", {"batch_label": "training batch 1 of 1", "fine_labels": fine,
                               "coarse_labels": [f // 5 for f in fine], "data": _cifar_rows([f % 50 for f in fine]),
                               "filenames": [str(i) for i in range(5)]})
    _pickle(folder / "test", {"batch_label": "testing batch 1 of 1", "fine_labels": [1, 2], "coarse_labels": [0, 0],
                              "data": _cifar_rows([1, 2]), "filenames": ["x", "y"]})
    _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                              "coarse_label_names": [f"g{i}" for i in range(20)]})
    return folder


def write_flowers(root: Path) -> Path:
    """12 images of 3 classes; setid.mat trnid 3, valid 3, tstid 6 (1-based ids), as (1, N) arrays like the release."""
    folder = root / "flowers"
    labels = np.array([[1, 2, 3, 1, 2, 3, 1, 2, 3, 3, 2, 1]], np.uint8)
    for i in range(1, 13):
        _jpg(folder / "jpg" / f"image_{i:05d}.jpg", 20 * i)
    savemat(folder / "imagelabels.mat", {"labels": labels})
    savemat(folder / "setid.mat", {"trnid": np.array([[5, 1, 9]]), "valid": np.array([[2, 6, 10]]),
                                   "tstid": np.array([[3, 4, 7, 8, 11, 12]])})
    return folder


PETS_TRAINVAL = ["Abyssinian_100 1 1 1", "Abyssinian_101 1 1 1", "american_bulldog_100 2 2 1",
                 "american_bulldog_101 2 2 1", "Bengal_1 3 1 2", "Bengal_2 3 1 2"]


def write_pets(root: Path) -> Path:
    folder = root / "pets"
    (folder / "annotations").mkdir(parents=True)
    (folder / "annotations" / "trainval.txt").write_text("\n".join(PETS_TRAINVAL) + "\n")
    (folder / "annotations" / "test.txt").write_text("Abyssinian_1 1 1 1\nBengal_3 3 1 2\n")
    for i, line in enumerate(PETS_TRAINVAL + ["Abyssinian_1", "Bengal_3"]):
        _jpg(folder / "images" / f"{line.split()[0]}.jpg", 30 * i)
    return folder


AIRCRAFT = {  # image id: (variant, family, manufacturer); names hold spaces as in the release
    "1025794": ("707-320", "Boeing 707", "Boeing"), "1340192": ("A300B4", "A300", "Airbus"),
    "0056978": ("737-200", "Boeing 737", "Boeing"), "0822348": ("737-300", "Boeing 737", "Boeing"),
    "2031775": ("707-320", "Boeing 707", "Boeing"), "0063052": ("A300B4", "A300", "Airbus"),
}
AIRCRAFT_TEST = ["2031775", "0063052"]


def write_aircraft(root: Path) -> Path:
    folder = root / "fgvc_aircraft" / "fgvc-aircraft-2013b" / "data"
    folder.mkdir(parents=True)
    for level, kind in enumerate(("variant", "family", "manufacturer")):
        for split, ids in (("trainval", [i for i in AIRCRAFT if i not in AIRCRAFT_TEST]), ("test", AIRCRAFT_TEST)):
            (folder / f"images_{kind}_{split}.txt").write_text("".join(f"{i} {AIRCRAFT[i][level]}\n" for i in ids))
    for n, i in enumerate(AIRCRAFT):
        _jpg(folder / "images" / f"{i}.jpg", 40 * n)
    return folder


CARS = [(1, 0), (2, 0), (3, 1), (1, 1), (2, 0), (3, 0), (196, 1)]  # (class 1-based, test flag) per image


def write_cars(root: Path) -> Path:
    """cars_annos.mat as published: a 1 x N struct array `annotations` and a 1 x 196 cell `class_names`."""
    folder = root / "cars"
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annos = np.zeros((1, len(CARS)), dtype=[(f, "O") for f in fields])
    for i, (cls, test) in enumerate(CARS):
        annos[0, i] = (f"car_ims/{i + 1:06d}.jpg", np.uint8(1), np.uint8(2), np.uint16(9), np.uint16(7),
                       np.uint8(cls), np.uint8(test))
        _jpg(folder / "car_ims" / f"{i + 1:06d}.jpg", 30 * i)
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = f"Make Model {c + 1} 2012"
    savemat(folder / "cars_annos.mat", {"annotations": annos, "class_names": names})
    return folder


def write_inat(root: Path) -> Path:
    folder = root / "inat2018"
    cats = [{"id": 0, "name": "Aa b", "genus": "Aa", "kingdom": "Plantae", "supercategory": "Plantae"},
            {"id": 1, "name": "Zz y", "genus": "Zz", "kingdom": "Animalia", "supercategory": "Insecta"},
            {"id": 2, "name": "Aa c", "genus": "Aa", "kingdom": "Plantae", "supercategory": "Plantae"}]

    def split(ids_cats):
        images = [{"id": i, "file_name": f"train_val2018/{cats[c]['supercategory']}/{c}/{i}.jpg", "width": 10,
                   "height": 8} for i, c in ids_cats]
        annos = [{"id": 100 + i, "image_id": i, "category_id": c} for i, c in ids_cats]
        for im in images:
            _jpg(folder / im["file_name"], 10 * im["id"])
        return {"images": images, "annotations": annos, "categories": [{"id": c["id"], "name": c["name"]} for c in cats]}

    folder.mkdir(parents=True)
    (folder / "train2018.json").write_text(json.dumps(split([(1, 2), (2, 0), (3, 1), (4, 2)])))
    (folder / "val2018.json").write_text(json.dumps(split([(7, 1), (8, 0)])))
    (folder / "categories.json").write_text(json.dumps(cats))
    return folder


# ----- readers ----------------------------------------------------------------------------------
def test_cifar10_batches_counts_labels_and_pixel_layout(tmp_path):
    write_cifar10(tmp_path)
    train, test = (build_dataset("CIFAR10", str(tmp_path), s, None) for s in ("train", "eval"))
    assert (len(train), len(test), len(train.classes)) == (20, 3, 10) and train.classes[3] == "c3"
    assert train.targets[:8] == [0, 1, 2, 3, 1, 2, 3, 4] and test.targets == [9, 0, 3]
    img, label = test[0]
    assert img.size == (32, 32) and label == 9
    assert img.getpixel((1, 0)) == (200, 20, 30) and img.getpixel((0, 0)) == (19, 20, 30)  # planes, row-major


def test_cifar100_fine_and_coarse(tmp_path):
    write_cifar100(tmp_path)
    train = build_dataset("cifar100", str(tmp_path), "train", None)
    assert (len(train), len(train.classes), train.targets) == (5, 100, [0, 99, 50, 7, 7])
    coarse = build_dataset("CIFAR100", str(tmp_path), "train", None, class_type="coarse")
    assert (len(coarse.classes), coarse.targets, coarse.classes[19]) == (20, [0, 19, 10, 1, 1], "g19")
    assert len(build_dataset("CIFAR100", str(tmp_path), "eval", None)) == 2


def test_flowers_mat_files_splits_and_zero_based_labels(tmp_path):
    folder = write_flowers(tmp_path)
    train, test = (build_dataset("Flowers", str(tmp_path), s, None) for s in ("train", "eval"))
    assert len(train.classes) == 3 and (len(train), len(test)) == (6, 6)  # trnid + valid, tstid
    assert [f.name for f in train.files] == [f"image_{i:05d}.jpg" for i in (5, 1, 9, 2, 6, 10)]
    assert train.targets == [1, 0, 2, 1, 2, 2] and test.targets == [2, 0, 0, 1, 1, 0]  # labels 1..3 -> 0..2
    assert train[1][0].getpixel((0, 0))[0] == pytest.approx(20, abs=3) and train.files[1] == folder / "jpg/image_00001.jpg"


def test_pets_annotation_lists(tmp_path):
    write_pets(tmp_path)
    train, test = (build_dataset("Pets", str(tmp_path), s, None) for s in ("train", "eval"))
    assert (len(train), len(test)) == (6, 2) and train.targets == [0, 0, 1, 1, 2, 2] and test.targets == [0, 2]
    assert train.classes == ["Abyssinian", "american_bulldog", "Bengal"]
    assert train[2][0].mode == "RGB" and train.files[2].name == "american_bulldog_100.jpg"


def test_aircraft_class_types(tmp_path):
    write_aircraft(tmp_path)
    variant = build_dataset("Aircraft", str(tmp_path), "train", None)  # variant by default
    assert variant.classes == ["707-320", "737-200", "737-300", "A300B4"] and variant.targets == [0, 3, 1, 2]
    test = build_dataset("Aircraft", str(tmp_path), "eval", None, class_type="variant")
    assert [f.stem for f in test.files] == AIRCRAFT_TEST and test.targets == [0, 3]
    family = build_dataset("Aircraft", str(tmp_path), "train", None, class_type="family")
    assert family.classes == ["A300", "Boeing 707", "Boeing 737"] and family.targets == [1, 0, 2, 2]
    maker = build_dataset("Aircraft", str(tmp_path), "eval", None, class_type="manufacturer")
    assert maker.classes == ["Airbus", "Boeing"] and maker.targets == [1, 0]


def test_cars_annos_struct_array(tmp_path):
    write_cars(tmp_path)
    train, test = (build_dataset("Cars", str(tmp_path), s, None) for s in ("train", "eval"))
    assert len(train.classes) == 196 and train.classes[195] == "Make Model 196 2012"
    assert (len(train), len(test)) == (4, 3) and train.targets == [0, 1, 1, 2] and test.targets == [2, 0, 195]
    assert [f.name for f in test.files] == ["000003.jpg", "000004.jpg", "000007.jpg"]


def test_inat_json_species_and_taxonomy_levels(tmp_path):
    write_inat(tmp_path)
    train = build_dataset("iNat2018", str(tmp_path), "train", None)
    assert train.classes == ["Aa b", "Zz y", "Aa c"] and train.targets == [2, 0, 1, 2]  # species by category id
    assert train.files[0] == tmp_path / "inat2018/train_val2018/Plantae/2/1.jpg"
    val = build_dataset("inat2018", str(tmp_path), "eval", None)
    assert val.targets == [1, 0]
    genus = build_dataset("iNat2018", str(tmp_path), "train", None, class_type="genus")
    assert genus.classes == ["Aa", "Zz"] and genus.targets == [0, 0, 1, 0]


def test_image_folder_with_train_and_val_trees(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for c in ("daisy", "rose"):
            for i in range(n):
                _jpg(tmp_path / "tree" / split / c / f"{i}.jpg", 50 * i)
    train, val = (build_dataset(f"folder:{tmp_path / 'tree'}", "", s, None) for s in ("train", "eval"))
    assert (len(train), len(val), train.classes, val.targets) == (6, 2, ["daisy", "rose"], [0, 1])
    whole = build_dataset(f"folder:{tmp_path / 'tree' / 'train'}", "", "eval", None)  # no train/ inside: used whole
    assert len(whole) == 6
    r = FinetuneTransfer(pretrain_exp_name="p", dataset=f"folder:{tmp_path / 'tree'}")
    assert r.resolved_num_classes == 2 and r.run_name == "p/ft_folder_eval"


def _one_line_error(fn, *needles):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_and_malformed_files_give_one_line_errors(tmp_path):
    root = str(tmp_path)
    bd = lambda name, split="train", **kw: (lambda: build_dataset(name, root, split, None, **kw))  # noqa: E731
    _one_line_error(bd("CIFAR10"), "cifar/cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar.html")
    cifar = write_cifar10(tmp_path)
    (cifar / "data_batch_3").write_bytes(b"not a pickle")
    _one_line_error(bd("CIFAR10"), "data_batch_3 is not a readable CIFAR pickle")
    _pickle(cifar / "data_batch_3", {"labels": [1, 2], "data": np.zeros((2, 100), np.uint8)})
    _one_line_error(bd("CIFAR10"), "data_batch_3", "uint8 [N, 3072]")
    (cifar / "test_batch").unlink()
    _one_line_error(bd("CIFAR10", "eval"), "test_batch not found")

    _one_line_error(bd("Flowers"), "imagelabels.mat not found", "robots.ox.ac.uk/~vgg/data/flowers/102")
    flowers = write_flowers(tmp_path)
    savemat(flowers / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]])})
    _one_line_error(bd("Flowers", "eval"), "setid.mat has no 'tstid'")
    savemat(flowers / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[99]]), "tstid": np.array([[3]])})
    _one_line_error(bd("Flowers"), "outside 1..12")
    write_flowers(tmp_path)
    (flowers / "jpg" / "image_00010.jpg").unlink()  # the last training image
    _one_line_error(bd("Flowers"), "image_00010.jpg not found", "flowers/jpg")

    _one_line_error(bd("Pets"), "annotations/trainval.txt not found", "vgg/data/pets")
    pets = write_pets(tmp_path)
    (pets / "annotations" / "test.txt").write_text("Abyssinian_1 cat\n")
    _one_line_error(bd("Pets", "eval"), "test.txt line 'Abyssinian_1 cat'")

    aircraft = write_aircraft(tmp_path)
    _one_line_error(lambda: build_dataset("Aircraft", root, "train", None, class_type="model"), "variant, family, manufacturer")
    (aircraft / "images_family_test.txt").write_text("2031775 Concorde\n")
    _one_line_error(bd("Aircraft", "eval", class_type="family"), "'Concorde', absent from trainval")
    (aircraft / "images_manufacturer_trainval.txt").unlink()
    _one_line_error(bd("Aircraft", class_type="manufacturer"), "images_manufacturer_trainval.txt not found",
                    "fgvc_aircraft/fgvc-aircraft-2013b/data", "vgg/data/fgvc-aircraft")

    cars = write_cars(tmp_path)
    (cars / "cars_annos.mat").write_bytes(b"MATLAB? no")
    _one_line_error(bd("Cars"), "cars_annos.mat is not a readable .mat file", "ai.stanford.edu")
    savemat(cars / "cars_annos.mat", {"annotations": np.zeros((1, 2)), "class_names": np.zeros((1, 2))})
    _one_line_error(bd("Cars"), "lacks relative_im_path/class/test")

    inat = write_inat(tmp_path)
    (inat / "val2018.json").write_text("{broken")
    _one_line_error(bd("iNat2018", "eval"), "val2018.json is not valid JSON", "inat_comp")
    _one_line_error(bd("Flowers", class_type="family"), "does not apply to Flowers")
    _one_line_error(lambda: FinetuneTransfer(pretrain_exp_name="p", dataset="Pets", class_type="family"),
                    "does not apply to Pets")


# ----- few_shot -----------------------------------------------------------------------------------
def test_few_shot_picks_k_per_class_reproducibly():
    targets = [i % 4 for i in range(40)] + [4]  # classes 0..3 x 10 images, class 4 has one
    a = few_shot_indices(targets, 3, seed=0)
    assert sorted(a) == [0, 1, 2, 3, 4] and [len(v) for v in a.values()] == [3, 3, 3, 3, 1]
    assert all(targets[i] == c for c, idx in a.items() for i in idx) and all(len(set(v)) == len(v) for v in a.values())
    assert few_shot_indices(targets, 3, seed=0) == a
    others = [few_shot_indices(targets, 3, seed=s) for s in (1, 2, 3)]
    assert any(o != a for o in others)
    assert few_shot_indices(targets, 20, seed=0)[0] == list(range(0, 40, 4))  # more than a class has: all of them
    # one class's choice does not depend on the others: dropping class 4 leaves classes 0..3 unchanged
    assert {c: v for c, v in few_shot_indices(targets[:40], 3, seed=0).items()} == {c: a[c] for c in range(4)}


def test_recipe_few_shot_subset_recorded(tmp_path):
    write_flowers(tmp_path)
    r = FinetuneTransfer(pretrain_exp_name="pre", dataset="Flowers", data_root=str(tmp_path), few_shot=1,
                         output_dir=str(tmp_path / "out"), img_size=32)
    assert r.run_name == "pre/ft_flowers_1shot_eval"
    train = r.build_datasets()["train"]
    record = json.loads((r.output_path / "few_shot.json").read_text())
    assert len(train) == 3 and record["kept"] == 3 and record["train_images"] == 6
    full = build_dataset("Flowers", str(tmp_path), "train", None)
    assert sorted(full.targets[i] for i in record["indices"]) == [0, 1, 2] and list(train.indices) == record["indices"]
    assert record["per_class"]["3"] in ([2], [4], [5]) and record["files"][0].endswith(".jpg")
    again = FinetuneTransfer(pretrain_exp_name="pre", dataset="Flowers", data_root=str(tmp_path), few_shot=1,
                             output_dir=str(tmp_path / "out2"), img_size=32).build_datasets()["train"]
    assert list(again.indices) == record["indices"]


# ----- the recipe ---------------------------------------------------------------------------------
def test_recipe_values_match_the_fact_sheet():
    r = resolve_recipe("finetuning_transfer_exp.py")(pretrain_exp_name="p")
    assert type(r) is FinetuneTransfer and resolve_recipe("finetuning_transfer") is FinetuneTransfer
    assert (r.opt, r.momentum, r.weight_decay, r.clip_grad, r.clip_mode) == ("sgd", 0.9, 0.0, 1.0, "norm")
    assert r.scaled_lr == pytest.approx(0.03) and FinetuneTransfer(pretrain_exp_name="p", batch_size=256).scaled_lr == pytest.approx(0.015)
    assert FinetuneTransfer(pretrain_exp_name="p", lr=0.1, batch_size=256).scaled_lr == 0.1  # given lr: not scaled
    assert (r.warmup_epochs, r.warmup_lr, r.min_lr, r.layer_decay, r.max_epoch) == (20, 0.0, 1e-6, 0.75, 300)
    assert (r.aa, r.color_jitter, r.reprob, r.mixup, r.cutmix, r.smoothing) == (None, None, 0.0, 0.0, 0.0, 0.0)
    assert (r.encoder_arch, r.global_pool, r.drop_path, r.img_size, r.eval_interval) == ("vit_tiny_patch16", True, 0.0, 224, 10)
    assert (r.dataset, r.num_classes, r.run_name) == ("CIFAR100", None, "p/ft_cifar100_eval")  # the original's prefix
    method = FinetuneTransfer(pretrain_exp_name="p", num_classes=37, depth=1).build_model()
    assert method.mixup is None and type(method.criterion) is torch.nn.CrossEntropyLoss
    opt = FinetuneTransfer(pretrain_exp_name="p", num_classes=37, depth=1).build_optimizer(method)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_transforms_crop_flip_only_and_num_classes_from_data(tmp_path):
    write_aircraft(tmp_path)
    r = FinetuneTransfer(pretrain_exp_name="p", dataset="Aircraft", class_type="family", data_root=str(tmp_path))
    data = r.build_datasets()
    names = [type(t).__name__ for t in data["train"].transform.transforms]
    assert names == ["FastRandomResizedCrop", "MaybePILToTensor"]  # crop + flip, uint8 out (normalised on the device)
    rrc = data["train"].transform.transforms[0]
    assert (rrc.size, rrc.scale, rrc.interpolation, rrc.hflip) == (224, (0.08, 1.0), "bicubic", 0.5)
    ev = data["eval"].transform
    assert type(ev).__name__ == "ResizeCenterCrop" and (ev.resize_to, ev.size, ev.output) == (256, 224, "uint8")
    assert r.arch_record()["kwargs"]["num_classes"] == 3 and r.run_name == "p/ft_aircraft_family_eval"
    assert FinetuneTransfer(pretrain_exp_name="p", dataset="Aircraft", data_root=str(tmp_path)).resolved_num_classes == 4
    fixed = FinetuneTransfer(pretrain_exp_name="p", dataset="Aircraft", num_classes=100, data_root=str(tmp_path), depth=1)
    assert fixed.build_network().head.out_features == 100
    with pytest.raises(UserError, match="below the 4 classes"):
        FinetuneTransfer(pretrain_exp_name="p", dataset="Aircraft", num_classes=2, data_root=str(tmp_path)).build_datasets()


def _supervised_ckpt(path: Path) -> Path:
    """An original-format (8-GPU `module.model.*`) supervised checkpoint with a 1000-class head, like deit_tiny_300e."""
    import timm

    net = timm.create_model("vit_tiny_patch16", img_size=32, patch_size=4, depth=2, num_classes=1000, global_pool=True)
    save_checkpoint({"model": {f"module.model.{k}": v for k, v in net.state_dict().items()}, "start_epoch": 300}, path)
    return path


def test_seed_transfer_command_line_runs(tmp_path):
    """TRANSFER.md / transfer.sh: ssl_train -b 512 -d 0-3 -e <epoch> -f finetuning_transfer_exp.py --amp --ckpt <ckpt>
    --exp-options pretrain_exp_name=... dataset=CIFAR100 num_classes=100 warmup_epochs=... save_folder_prefix=...
    lr=... layer_decay=...; here with a tiny batch, image size and depth."""
    write_cifar100(tmp_path / "data")
    ckpt = _supervised_ckpt(tmp_path / "deit_tiny_300e.pth.tar")
    devices = "0-3" if not torch.cuda.is_available() else "cpu"  # no GPU: ssl_train falls back to the CPU
    assert ssl_train(["-b", "4", "-d", devices, "-e", "1", "-f", "finetuning_transfer_exp.py", "--amp", "--ckpt", str(ckpt),
                      "--exp-options", "pretrain_exp_name=scratch/deit_tiny_300e", "dataset=CIFAR100", "num_classes=100",
                      "warmup_epochs=10", "save_folder_prefix=cifar_", "lr=0.1", "layer_decay=0.75",
                      f"data_root={tmp_path / 'data'}", f"output_dir={tmp_path / 'outputs'}", *TINY]) == 0
    out = tmp_path / "outputs/scratch/deit_tiny_300e/cifar_eval"
    log = next(out.glob("train_log-*.txt")).read_text()
    assert "skipped 2 (head.weight, head.bias)" in log and "loaded 30 tensors" in log  # head dropped, fc_norm kept
    assert "Top1:" in log and "lr 0.1" in log
    ck = load_checkpoint(out / "last_epoch_ckpt.pth.tar")
    assert ck["model"]["model.head.weight"].shape == (100, 192) and ck["best_top1_epoch"] == 1
    assert ck["best_top1"] in (0.0, 50.0, 100.0)  # 2 test images


def test_transfer_run_follows_data_set_classes_and_reports_top1(tmp_path, capsys):
    from mae_lite.cli.eval import main as ssl_eval

    write_pets(tmp_path / "data")
    assert ssl_train(["-b", "2", "-d", "cpu", "-e", "1", "-f", "finetuning_transfer", "--exp-options",
                      "pretrain_exp_name=scratch/t", "dataset=Pets", "few_shot=1", f"data_root={tmp_path / 'data'}",
                      f"output_dir={tmp_path}", *TINY]) == 0
    out = tmp_path / "scratch/t/ft_pets_1shot_eval"
    log = next(out.glob("train_log-*.txt")).read_text()
    record = json.loads((out / "few_shot.json").read_text())
    assert f"indices {record['indices']}" in log and "kept 3 of 6 training images" in log
    assert "Top1:" in log and "training 1 epochs x 1 iterations" in log  # 3 images, batch 2, drop_last
    ck = load_checkpoint(out / "last_epoch_ckpt.pth.tar")
    assert ck["arch"]["kwargs"]["num_classes"] == 3 and ck["model"]["model.head.weight"].shape[0] == 3
    capsys.readouterr()  # ssl_eval builds the same 3-class network from the data set and gets the logged top-1
    assert ssl_eval(["-d", "cpu", "-f", "finetuning_transfer_exp.py", "--ckpt", str(out / "last_epoch_ckpt.pth.tar"),
                     "--exp-options", "pretrain_exp_name=scratch/t", "dataset=Pets", f"data_root={tmp_path / 'data'}",
                     *TINY]) == 0
    logged = float(log.split("Top1: ")[-1].split(",")[0])
    assert float(capsys.readouterr().out.split("Top1: ")[1].split(",")[0]) == pytest.approx(logged)


# ----- ssl_sweep ----------------------------------------------------------------------------------
def test_sweep_writes_final_and_best_table(tmp_path, capsys):
    from mae_lite.cli.sweep import main as ssl_sweep

    write_cifar10(tmp_path / "data")
    argv = ["-d", "cpu", "-b", "4", "-e", "1", "--lr", "0.01", "0.1", "--layer-decay", "0.75", "--exp-options",
            "pretrain_exp_name=scratch/s", "dataset=CIFAR10", f"data_root={tmp_path / 'data'}", f"output_dir={tmp_path}",
            "warmup_epochs=0", *TINY]
    assert ssl_sweep(argv) == 0
    folder = tmp_path / "scratch/s/ft_cifar10_sweep"
    table = json.loads((folder / "sweep.json").read_text())
    runs = table["runs"]
    assert [(r["lr"], r["layer_decay"], r["status"]) for r in runs] == [(0.01, 0.75, "done"), (0.1, 0.75, "done")]
    for r in runs:
        ck = load_checkpoint(folder / f"lr{r['lr']:g}_ld{r['layer_decay']:g}_eval" / "last_epoch_ckpt.pth.tar")
        assert r["best_top1"] == ck["best_top1"] and r["best_epoch"] == 1 and r["final_top1"] == ck["best_top1"]
        assert ck["config"]["lr"] == r["lr"] and ck["config"]["layer_decay"] == 0.75
    md = (folder / "sweep.md").read_text()
    assert "| lr \\ layer_decay | 0.75 |" in md and f"| 0.1 | {runs[1]['final_top1']:.2f} / {runs[1]['best_top1']:.2f} (ep 1) |" in md
    assert "initial weights none (from scratch)" in md and str(folder / "sweep.md") in capsys.readouterr().out
    logs_before = sorted(folder.rglob("train_log-*.txt"))
    assert ssl_sweep(argv) == 0  # the same grid again: reused from sweep.json, nothing retrained
    assert sorted(folder.rglob("train_log-*.txt")) == logs_before
    assert ssl_sweep(argv[:9] + ["--layer-decay", "0"] + argv[11:]) == 2  # refused before any training


def test_sweep_under_torchrun_with_two_processes(tmp_path):
    """Every rank trains each point; only rank 0 has the checkpoint and the table (the others used to crash on
    load_checkpoint(None) and leave rank 0 hanging)."""
    import sys

    from _proc import run_process

    write_cifar10(tmp_path / "data")
    proc = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "mae_lite.cli.sweep", "-d", "cpu", "-b", "4", "-e", "1", "--lr", "0.01", "--exp-options",
                        "pretrain_exp_name=scratch/t", "dataset=CIFAR10", f"data_root={tmp_path / 'data'}",
                        f"output_dir={tmp_path}", "warmup_epochs=0", *TINY], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "scratch/t/ft_cifar10_sweep"
    (run,) = json.loads((folder / "sweep.json").read_text())["runs"]
    ck = load_checkpoint(folder / "lr0.01_ld0.75_eval" / "last_epoch_ckpt.pth.tar")
    assert run["status"] == "done" and run["best_top1"] == ck["best_top1"] and len(ck["rng"]) == 2


def test_sweep_records_a_diverged_point_and_goes_on(tmp_path):
    from mae_lite.cli.sweep import main as ssl_sweep

    write_cifar10(tmp_path / "data")
    assert ssl_sweep(["-d", "cpu", "-b", "4", "-e", "1", "--lr", "1e30", "--exp-options", "pretrain_exp_name=scratch/d",
                      "dataset=CIFAR10", f"data_root={tmp_path / 'data'}", f"output_dir={tmp_path}", "warmup_epochs=0",
                      "clip_grad=none", "save_folder_prefix=big_", *TINY]) == 0
    table = json.loads((tmp_path / "scratch/d/big_sweep/sweep.json").read_text())
    assert [(r["lr"], r["status"]) for r in table["runs"]] == [(1e30, "diverged")] and "loss is" in table["runs"][0]["message"]
    assert "| 1e+30 | diverged |" in (tmp_path / "scratch/d/big_sweep/sweep.md").read_text()


def test_sweep_stopped_by_a_signal_records_the_point_and_resumes_it(tmp_path, monkeypatch, capsys):
    from mae_lite.cli.sweep import main as ssl_sweep
    from mae_lite.engine import loop

    write_cifar10(tmp_path / "data")
    argv = ["-d", "cpu", "-b", "4", "-e", "1", "--lr", "0.01", "0.1", "--layer-decay", "0.75", "--exp-options",
            "pretrain_exp_name=scratch/p", "dataset=CIFAR10", f"data_root={tmp_path / 'data'}", f"output_dir={tmp_path}",
            "warmup_epochs=0", "print_interval=1", *TINY]  # the loop reads the stop flags every print_interval steps
    real, calls = loop._sync_step, []

    def signal_at_second_step(loss, stopper, env):  # as if SIGTERM had arrived during step 2 of the first point
        calls.append(1)
        avg, stop, save = real(loss, stopper, env)
        return avg, stop or len(calls) == 2, save

    monkeypatch.setattr(loop, "_sync_step", signal_at_second_step)
    assert ssl_sweep(argv) == 3
    assert "run the same ssl_sweep command again" in capsys.readouterr().err
    folder = tmp_path / "scratch/p/ft_cifar10_sweep"
    runs = json.loads((folder / "sweep.json").read_text())["runs"]
    assert [(r["lr"], r["status"]) for r in runs] == [(0.01, "stopped")]
    ckpt = load_checkpoint(folder / "lr0.01_ld0.75_eval" / "last_epoch_ckpt.pth.tar")
    assert (ckpt["start_epoch"], ckpt["iteration"]) == (0, 2)
    monkeypatch.setattr(loop, "_sync_step", real)
    assert ssl_sweep(argv) == 0
    runs = json.loads((folder / "sweep.json").read_text())["runs"]
    assert [(r["lr"], r["status"]) for r in runs] == [(0.01, "done"), (0.1, "done")]
    log = "".join(p.read_text() for p in (folder / "lr0.01_ld0.75_eval").glob("train_log-*.txt"))
    assert "iteration 2 of epoch 1" in log  # the interrupted point continued from its checkpoint
