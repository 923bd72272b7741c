"""The transfer classification sets, read from the layouts their publishers ship; nothing is downloaded.

Under `<data_root>` (the original's `<root>/data`):

| name | folder | what is read | classes |
|---|---|---|---|
| CIFAR10 | cifar/cifar-10-batches-py/ | data_batch_1..5, test_batch, batches.meta (python pickles) | 10 |
| CIFAR100 | cifar/cifar-100-python/ | train, test, meta | 100 fine (20 coarse) |
| Flowers | flowers/ | jpg/image_%05d.jpg, imagelabels.mat, setid.mat (train = trnid + valid) | 102 |
| Pets | pets/ | images/*.jpg, annotations/trainval.txt, test.txt | 37 |
| Aircraft | fgvc_aircraft/fgvc-aircraft-2013b/data/ | images/*.jpg, images_<type>_{trainval,test}.txt | 100 variants (70 families, 30 manufacturers) |
| Cars | cars/ | car_ims/*.jpg, cars_annos.mat (train/test by its test flag) | 196 |
| iNat2018 | inat2018/ | train2018.json, val2018.json, (categories.json), the image files they name | 8142 species |

Every reader returns a dataset with `classes` (label k is `classes[k]`) and `targets` (0-based labels).
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError


@dataclass(frozen=True)
class SetInfo:
    title: str  # as the publisher names it
    folder: str  # under <data_root>
    url: str  # where to get it
    class_types: tuple[str, ...] = ("",)  # accepted class_type values, the default first


TRANSFER_SETS: dict[str, SetInfo] = {
    "cifar10": SetInfo("CIFAR-10", "cifar/cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar.html "
                       "(cifar-10-python.tar.gz)"),
    "cifar100": SetInfo("CIFAR-100", "cifar/cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar.html "
                        "(cifar-100-python.tar.gz)", ("fine", "coarse")),
    "flowers": SetInfo("Oxford 102 Flowers", "flowers", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    "pets": SetInfo("Oxford-IIIT Pets", "pets", "https://www.robots.ox.ac.uk/~vgg/data/pets/"),
    "aircraft": SetInfo("FGVC-Aircraft 2013b", "fgvc_aircraft/fgvc-aircraft-2013b/data",
                        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/", ("variant", "family", "manufacturer")),
    "cars": SetInfo("Stanford Cars", "cars", "https://ai.stanford.edu/~jkrause/cars/car_dataset.html "
                    "(car_ims.tgz and cars_annos.mat)"),
    "inat2018": SetInfo("iNaturalist 2018", "inat2018", "https://github.com/visipedia/inat_comp/tree/master/2018",
                        ("name", "kingdom", "phylum", "class", "order", "family", "genus", "supercategory")),
}
CANONICAL = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "flowers": "Flowers", "pets": "Pets",
             "aircraft": "Aircraft", "cars": "Cars", "inat2018": "iNat2018"}


def is_transfer_set(name: str) -> bool:
    return name.lower() in TRANSFER_SETS


def class_types(name: str) -> tuple[str, ...]:
    return TRANSFER_SETS[name.lower()].class_types


def _fail(key: str, data_root: Path, problem: str) -> UserError:
    """One line: what is wrong, where the files are expected, where to get the data set."""
    info = TRANSFER_SETS[key]
    return UserError(f"{info.title}: {problem}; expected the published files under {Path(data_root) / info.folder}/ "
                     f"(get them from {info.url}, or set data_root=...)")


# ----- the datasets ------------------------------------------------------------------------------
class ArrayImages(Dataset):
    """Images held in memory as uint8 [N, H, W, 3] (CIFAR): workers never touch the disk."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str],
                 transform: Optional[Callable]):
        self.images, self.targets, self.classes, self.transform = images, list(targets), list(classes), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


class FileImages(Dataset):
    """Image files with 0-based labels, decoded to RGB (some Pets/Flowers files are grey or CMYK)."""

    def __init__(self, files: Sequence[Path], targets: Sequence[int], classes: Sequence[str],
                 transform: Optional[Callable]):
        self.files, self.targets, self.classes, self.transform = list(files), list(targets), list(classes), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        with open(self.files[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return (self.transform(img) if self.transform else img), self.targets[i]


def _check_files(key: str, root: Path, files: Sequence[Path], folder: str) -> None:
    """The first and last image of the split exist: catches an unextracted archive without a stat per image."""
    if not files:
        raise _fail(key, root, "the split lists no images")
    for f in (files[0], files[-1]):
        if not f.is_file():
            raise _fail(key, root, f"image {f} not found (extract the images into {folder}/)")


# ----- CIFAR -------------------------------------------------------------------------------------
def _unpickle(key: str, root: Path, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _fail(key, root, f"{path.name} not found")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")  # the files are Python 2 pickles
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise _fail(key, root, f"{path.name} is not a readable CIFAR pickle ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _fail(key, root, f"{path.name} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(key: str, root: Path, batch: dict[str, Any], name: str, file: str) -> Any:
    if name not in batch:
        raise _fail(key, root, f"{file} has no '{name}' entry")
    return batch[name]


def cifar(data_root: str | Path, split: str, transform: Optional[Callable], hundred: bool,
          class_type: str = "") -> ArrayImages:
    key = "cifar100" if hundred else "cifar10"
    root = Path(data_root)
    folder = root / TRANSFER_SETS[key].folder
    if hundred:
        files, meta_file = (["train"] if split == "train" else ["test"]), "meta"
        coarse = class_type == "coarse"
        label_key = "coarse_labels" if coarse else "fine_labels"
        names_key = "coarse_label_names" if coarse else "fine_label_names"
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
    if not folder.is_dir():
        raise _fail(key, root, "folder not found")
    classes = [str(c) for c in _field(key, root, _unpickle(key, root, folder / meta_file), names_key, meta_file)]
    images, targets = [], []
    for name in files:
        batch = _unpickle(key, root, folder / name)
        data = np.asarray(_field(key, root, batch, "data", name))
        labels = [int(v) for v in _field(key, root, batch, label_key, name)]
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise _fail(key, root, f"{name}: 'data' is {data.dtype} {data.shape} for {len(labels)} labels, "
                                   "expected uint8 [N, 3072] (one row per label)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are R plane, G plane, B plane
        targets += labels
    if targets and not 0 <= min(targets) <= max(targets) < len(classes):
        raise _fail(key, root, f"labels outside 0..{len(classes) - 1} (the {meta_file} class list)")
    return ArrayImages(np.ascontiguousarray(np.concatenate(images)), targets, classes, transform)


# ----- the .mat sets -----------------------------------------------------------------------------
def _loadmat(key: str, root: Path, path: Path) -> dict[str, Any]:
    from scipy.io import loadmat

    if not path.is_file():
        raise _fail(key, root, f"{path.name} not found")
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as e:  # noqa: BLE001
        raise _fail(key, root, f"{path.name} is not a readable .mat file ({type(e).__name__})") from None


def _mat_ints(key: str, root: Path, mat: dict[str, Any], name: str, file: str) -> np.ndarray:
    if name not in mat:
        raise _fail(key, root, f"{file} has no '{name}' variable")
    try:
        return np.atleast_1d(np.asarray(mat[name])).astype(np.int64).ravel()
    except (TypeError, ValueError):
        raise _fail(key, root, f"{file}: '{name}' is not a list of integers") from None


def flowers(data_root: str | Path, split: str, transform: Optional[Callable]) -> FileImages:
    """train = trnid + valid (2040 images), eval = tstid (6149); labels 1..102 in the file, 0-based here."""
    key, root = "flowers", Path(data_root)
    folder = root / TRANSFER_SETS[key].folder
    labels = _mat_ints(key, root, _loadmat(key, root, folder / "imagelabels.mat"), "labels", "imagelabels.mat")
    setid = _loadmat(key, root, folder / "setid.mat")
    parts = ("trnid", "valid") if split == "train" else ("tstid",)
    ids = np.concatenate([_mat_ints(key, root, setid, p, "setid.mat") for p in parts])
    if len(ids) and (ids.min() < 1 or ids.max() > len(labels)):
        raise _fail(key, root, f"setid.mat names image ids outside 1..{len(labels)} (the imagelabels.mat length)")
    if labels.size == 0 or labels.min() < 1:
        raise _fail(key, root, "imagelabels.mat has no labels, or labels below 1 (they are 1-based)")
    n_classes = int(labels.max())
    files = [folder / "jpg" / f"image_{i:05d}.jpg" for i in ids]
    _check_files(key, root, files, str(folder / "jpg"))
    return FileImages(files, [int(labels[i - 1]) - 1 for i in ids], [str(c) for c in range(1, n_classes + 1)], transform)


def _scalar(x: Any) -> Any:
    """A value from a loadmat struct field, however deeply numpy wrapped it."""
    while isinstance(x, np.ndarray):
        if x.size != 1:
            raise ValueError("not a scalar")
        x = x.reshape(-1)[0]
    return x.item() if isinstance(x, np.generic) else x


def cars(data_root: str | Path, split: str, transform: Optional[Callable]) -> FileImages:
    """The all-in-one `cars_annos.mat`: one struct per image (relative_im_path, bbox, class 1..196, test 0/1)."""
    key, root = "cars", Path(data_root)
    folder = root / TRANSFER_SETS[key].folder
    mat = _loadmat(key, root, folder / "cars_annos.mat")
    if "annotations" not in mat or "class_names" not in mat:
        raise _fail(key, root, "cars_annos.mat lacks the 'annotations' or 'class_names' variable")
    annos = np.atleast_1d(mat["annotations"])
    names = [str(_scalar(c)) for c in np.atleast_1d(mat["class_names"])]
    fields = set(annos.dtype.names or ())
    if not {"relative_im_path", "class", "test"} <= fields:
        raise _fail(key, root, "cars_annos.mat 'annotations' lacks relative_im_path/class/test fields")
    want_test = split != "train"
    files, targets = [], []
    try:
        for a in annos:
            if bool(_scalar(a["test"])) == want_test:
                files.append(folder / str(_scalar(a["relative_im_path"])))
                targets.append(int(_scalar(a["class"])) - 1)
    except (ValueError, TypeError):
        raise _fail(key, root, "cars_annos.mat has an annotation whose path, class or test flag "
                               "is not a single value") from None
    if targets and not 0 <= min(targets) <= max(targets) < len(names):
        raise _fail(key, root, f"cars_annos.mat has classes outside 1..{len(names)} (its class_names)")
    _check_files(key, root, files, str(folder / "car_ims"))
    return FileImages(files, targets, names, transform)


# ----- the text-list sets ------------------------------------------------------------------------
def _lines(key: str, root: Path, path: Path) -> list[str]:
    if not path.is_file():
        raise _fail(key, root, f"{path.relative_to(root / TRANSFER_SETS[key].folder)} not found")
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def pets(data_root: str | Path, split: str, transform: Optional[Callable]) -> FileImages:
    """annotations/{trainval,test}.txt lines `<image> <class id 1..37> <species> <breed id>`; label = class id - 1."""
    key, root = "pets", Path(data_root)
    folder = root / TRANSFER_SETS[key].folder
    lists = {s: _lines(key, root, folder / "annotations" / f"{s}.txt") for s in ("trainval", "test")}
    names: dict[int, str] = {}
    rows = {}
    for s, lines in lists.items():
        rows[s] = []
        for ln in lines:
            parts = ln.split()
            if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < 1:
                raise _fail(key, root, f"annotations/{s}.txt line {ln!r} is not '<image> <class id> <species> <breed>'")
            cid = int(parts[1])
            names.setdefault(cid, parts[0].rsplit("_", 1)[0])  # Abyssinian_100 -> Abyssinian
            rows[s].append((parts[0], cid - 1))
    n_classes = max(names)
    classes = [names.get(c, str(c)) for c in range(1, n_classes + 1)]
    chosen = rows["trainval" if split == "train" else "test"]
    files = [folder / "images" / f"{img}.jpg" for img, _ in chosen]
    _check_files(key, root, files, str(folder / "images"))
    return FileImages(files, [t for _, t in chosen], classes, transform)


def aircraft(data_root: str | Path, split: str, transform: Optional[Callable], class_type: str = "variant") -> FileImages:
    """data/images_<type>_{trainval,test}.txt lines `<image id> <name>` (names may hold spaces); the class index
    is the position in the sorted names of the trainval list, as the original."""
    key, root = "aircraft", Path(data_root)
    folder = root / TRANSFER_SETS[key].folder
    class_type = class_type or "variant"
    parsed = {}
    for s in ("trainval", "test"):
        rows = []
        for ln in _lines(key, root, folder / f"images_{class_type}_{s}.txt"):
            parts = ln.split(" ", 1)
            if len(parts) != 2 or not parts[1].strip():
                raise _fail(key, root, f"images_{class_type}_{s}.txt line {ln!r} is not '<image id> <{class_type}>'")
            rows.append((parts[0], parts[1].strip()))
        parsed[s] = rows
    classes = sorted({name for _, name in parsed["trainval"]})
    index = {c: i for i, c in enumerate(classes)}
    chosen = parsed["trainval" if split == "train" else "test"]
    unknown = sorted({n for _, n in chosen if n not in index})
    if unknown:
        raise _fail(key, root, f"images_{class_type}_test.txt names {class_type} {unknown[0]!r}, absent from trainval")
    files = [folder / "images" / f"{img}.jpg" for img, _ in chosen]
    _check_files(key, root, files, str(folder / "images"))
    return FileImages(files, [index[n] for _, n in chosen], classes, transform)


# ----- iNaturalist -------------------------------------------------------------------------------
def _load_json(key: str, root: Path, path: Path) -> Any:
    if not path.is_file():
        raise _fail(key, root, f"{path.name} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(key, root, f"{path.name} is not valid JSON ({str(e).splitlines()[0][:80]})") from None


def inat(data_root: str | Path, split: str, transform: Optional[Callable], class_type: str = "name",
         year: int = 2018) -> FileImages:
    """COCO-style `train<year>.json` / `val<year>.json` (images, annotations with category_id), image paths
    relative to the folder. `class_type`: `name` (species; label = rank of the category id) or a taxonomy level
    of `categories.json` (label = rank of the level's value in sorted order)."""
    key, root = "inat2018", Path(data_root)
    folder = root / f"inat{year}"
    level = class_type or "name"
    data = _load_json(key, root, folder / f"{'train' if split == 'train' else 'val'}{year}.json")
    try:
        cats_src = folder / "categories.json"
        cats = _load_json(key, root, cats_src) if cats_src.is_file() else data["categories"]
        by_id = {int(c["id"]): c for c in cats}
        label_of_image = {int(a["image_id"]): int(a["category_id"]) for a in data["annotations"]}
        images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(key, root, f"the {year} JSON files lack the COCO-style images/annotations/categories "
                               f"entries ({type(e).__name__}: {e})") from None
    if level == "name":
        ids = sorted(by_id)
        classes = [str(by_id[i].get("name", i)) for i in ids]
        cls_of = {cid: r for r, cid in enumerate(ids)}
    else:
        missing = [cid for cid, c in by_id.items() if level not in c]
        if missing:
            raise _fail(key, root, f"category {missing[0]} has no '{level}' entry (use categories.json for "
                                   "taxonomy levels, or class_type=name)")
        classes = sorted({str(c[level]) for c in by_id.values()})
        rank = {v: r for r, v in enumerate(classes)}
        cls_of = {cid: rank[str(c[level])] for cid, c in by_id.items()}
    files, targets = [], []
    for image_id, name in images:
        cid = label_of_image.get(image_id)
        if cid is None or cid not in cls_of:
            raise _fail(key, root, f"image {image_id} ({name}) has no annotation with a known category_id")
        files.append(folder / name)
        targets.append(cls_of[cid])
    _check_files(key, root, files, str(folder))
    return FileImages(files, targets, classes, transform)


# ----- by name -----------------------------------------------------------------------------------
def transfer_set(name: str, data_root: str | Path, split: str, transform: Optional[Callable],
                 class_type: str = "") -> Dataset:
    """The `split` ("train" or "eval") of transfer set `name` (any case); `class_type` "" is the set's default."""
    key = name.lower()
    allowed = TRANSFER_SETS[key].class_types
    if class_type and class_type not in allowed:
        choices = ", ".join(a for a in allowed if a) or "none (leave class_type empty)"
        raise UserError(f"class_type={class_type!r} does not apply to {CANONICAL[key]}; choices: {choices}")
    if key in ("cifar10", "cifar100"):
        return cifar(data_root, split, transform, hundred=key == "cifar100", class_type=class_type)
    if key == "flowers":
        return flowers(data_root, split, transform)
    if key == "pets":
        return pets(data_root, split, transform)
    if key == "aircraft":
        return aircraft(data_root, split, transform, class_type)
    if key == "cars":
        return cars(data_root, split, transform)
    year = int(re.fullmatch(r"inat(\d{4})", key).group(1))
    return inat(data_root, split, transform, class_type, year)


def split_subfolder(root: Path, split: str) -> Path:
    """A class-per-folder tree split as `<root>/train/` + `<root>/val/` (or `test/`) gives the split's sub-folder;
    any other tree is used whole for both splits."""
    evals = [root / n for n in ("val", "test") if (root / n).is_dir()]
    if not (root / "train").is_dir() or not evals:
        return root
    return root / "train" if split == "train" else evals[0]
