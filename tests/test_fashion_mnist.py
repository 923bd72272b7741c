"""Fashion-MNIST from IDX files (CPU, fast): tiny hand-written fixtures, plus the real
Debian files only when they are installed."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from mae_lite.data import fashion_mnist
from mae_lite.data.fashion_mnist import CLASSES, FashionMNIST
from mae_lite.errors import UserError

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")

# Image k is black except pixel (row 3, col 4) = VALUES[k] and pixel (27, 0) = k + 1.
TRAIN_VALUES, TRAIN_LABELS = [11, 200, 37], [9, 0, 4]
TEST_VALUES, TEST_LABELS = [5, 250], [3, 7]


def _images_bytes(values, magic=2051, count=None, rows=28, cols=28):
    pixels = np.zeros((len(values), rows, cols), dtype=np.uint8)
    for k, v in enumerate(values):
        pixels[k, 3, 4] = v
        pixels[k, rows - 1, 0] = k + 1
    n = len(values) if count is None else count
    return struct.pack(">IIII", magic, n, rows, cols) + pixels.tobytes()


def _labels_bytes(labels, magic=2049, count=None):
    n = len(labels) if count is None else count
    return struct.pack(">II", magic, n) + bytes(labels)


def _write(folder: Path, name: str, data: bytes, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _write_split(folder: Path, train: bool = True, gz: bool = False, images=None, labels=None):
    prefix = "train" if train else "t10k"
    values, labs = (TRAIN_VALUES, TRAIN_LABELS) if train else (TEST_VALUES, TEST_LABELS)
    img = _write(folder, f"{prefix}-images-idx3-ubyte", images if images is not None else _images_bytes(values), gz)
    lab = _write(folder, f"{prefix}-labels-idx1-ubyte", labels if labels is not None else _labels_bytes(labs), gz)
    return img, lab


@pytest.fixture(autouse=True)
def no_debian(tmp_path, monkeypatch):
    """Point the Debian folder at an empty place, so installed real data never leaks into a test."""
    fake = tmp_path / "debian-fashion-mnist"
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", fake)
    return fake


def _user_error(root, **kw) -> str:
    with pytest.raises(UserError) as info:
        FashionMNIST(root, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("layout", ["fashion_mnist", "fashion_mnist/raw", "FashionMNIST/raw", "debian"])
def test_reads_each_layout(tmp_path, no_debian, layout, gz):
    root = tmp_path / "data"
    folder = no_debian if layout == "debian" else root / layout
    _write_split(folder, train=True, gz=gz)
    ds = FashionMNIST(None if layout == "debian" else root, train=True)
    assert len(ds) == 3
    assert ds.folder == folder
    assert ds.images.dtype == np.uint8 and ds.images.shape == (3, 28, 28)
    assert ds.targets.dtype == np.int64 and ds.targets.tolist() == TRAIN_LABELS
    assert ds.classes == list(CLASSES) and len(ds.classes) == 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    for k in range(3):
        img, label = ds[k]
        assert img.mode == "RGB" and img.size == (28, 28)
        assert type(label) is int and label == TRAIN_LABELS[k]
        arr = np.asarray(img)
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
        assert arr[3, 4, 0] == TRAIN_VALUES[k]
        assert arr[27, 0, 0] == k + 1
        assert int(arr.sum()) == 3 * (TRAIN_VALUES[k] + k + 1)  # nothing else is lit
    assert tuple(np.asarray(ds[1][0])[3, 4]) == (200, 200, 200)


def test_root_none_without_debian_files_names_the_fix(no_debian):
    msg = _user_error(None)
    assert str(no_debian) in msg
    assert "dataset-fashion-mnist" in msg and "<data_root>/fashion_mnist/" in msg


def test_layout_order_and_plain_before_gz(tmp_path, no_debian):
    root = tmp_path / "data"
    _write_split(root / "FashionMNIST" / "raw", images=_images_bytes([1, 2, 3, 4]), labels=_labels_bytes([1, 1, 1, 1]))
    _write_split(no_debian, images=_images_bytes([9]), labels=_labels_bytes([2]))
    _write_split(root / "fashion_mnist", gz=True)
    _write_split(root / "fashion_mnist", gz=False, images=_images_bytes([7, 8]), labels=_labels_bytes([5, 6]))
    ds = FashionMNIST(root)
    assert ds.images_file == root / "fashion_mnist" / "train-images-idx3-ubyte"
    assert ds.targets.tolist() == [5, 6]
    (root / "fashion_mnist" / "train-images-idx3-ubyte").unlink()
    (root / "fashion_mnist" / "train-labels-idx1-ubyte").unlink()
    assert FashionMNIST(root).targets.tolist() == TRAIN_LABELS  # now the .gz pair
    for p in (root / "fashion_mnist").iterdir():
        p.unlink()
    assert FashionMNIST(root).targets.tolist() == [1, 1, 1, 1]  # torchvision's layout beats Debian's


def test_train_and_test_splits_pick_their_files(tmp_path):
    folder = tmp_path / "fashion_mnist"
    _write_split(folder, train=True)
    _write_split(folder, train=False, gz=True)
    train, test = FashionMNIST(tmp_path, train=True), FashionMNIST(tmp_path, train=False)
    assert train.images_file.name == "train-images-idx3-ubyte"
    assert test.images_file.name == "t10k-images-idx3-ubyte.gz"
    assert test.labels_file.name == "t10k-labels-idx1-ubyte.gz"
    assert len(train) == 3 and len(test) == 2
    assert test.targets.tolist() == TEST_LABELS
    assert [int(np.asarray(test[k][0])[3, 4, 1]) for k in range(2)] == TEST_VALUES


def test_limit_keeps_the_first_images(tmp_path):
    _write_split(tmp_path / "fashion_mnist")
    ds = FashionMNIST(tmp_path, limit=2)
    assert len(ds) == 2 and ds.targets.tolist() == TRAIN_LABELS[:2]
    assert np.asarray(ds[1][0])[3, 4, 0] == TRAIN_VALUES[1]
    assert ds.images.flags.writeable and ds.images.flags.owndata
    assert len(FashionMNIST(tmp_path, limit=100)) == 3
    with pytest.raises(IndexError):
        ds[2]
    for bad in (0, -1, 1.5):
        assert "limit" in _user_error(tmp_path, limit=bad)


def test_transform_is_applied_and_dataset_pickles(tmp_path):
    _write_split(tmp_path / "fashion_mnist")
    ds = FashionMNIST(tmp_path, transform=transforms.ToTensor())
    x, y = ds[1]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 28, 28)
    assert x[:, 3, 4].tolist() == pytest.approx([200 / 255] * 3)
    assert y == 0
    clone = pickle.loads(pickle.dumps(ds))  # data loader workers get a pickled copy
    assert np.array_equal(clone.images, ds.images) and clone.targets.tolist() == TRAIN_LABELS


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("case", ["images_magic", "labels_magic", "truncated_images", "truncated_header",
                                  "trailing_bytes", "truncated_labels", "not_28x28", "label_10"])
def test_malformed_file_is_named(tmp_path, case, gz):
    folder = tmp_path / "fashion_mnist"
    images, labels = _images_bytes(TRAIN_VALUES), _labels_bytes(TRAIN_LABELS)
    at_fault = "images"
    if case == "images_magic":
        images = _images_bytes(TRAIN_VALUES, magic=2049)
    elif case == "labels_magic":
        labels, at_fault = _labels_bytes(TRAIN_LABELS, magic=2051), "labels"
    elif case == "truncated_images":
        images = images[:-100]
    elif case == "truncated_header":
        images = images[:10]
    elif case == "trailing_bytes":
        images = images + b"\0"
    elif case == "truncated_labels":
        labels, at_fault = labels[:-1], "labels"
    elif case == "not_28x28":
        images = _images_bytes(TRAIN_VALUES, rows=14, cols=14)
    elif case == "label_10":
        labels, at_fault = _labels_bytes([1, 10, 2]), "labels"
    img, lab = _write_split(folder, gz=gz, images=images, labels=labels)
    msg = _user_error(tmp_path)
    assert str(img if at_fault == "images" else lab) in msg
    assert "dataset-fashion-mnist" in msg and f"{folder}/" in msg
    expected = {"images_magic": "2051", "labels_magic": "2049", "truncated_images": "truncated",
                "truncated_header": "truncated", "trailing_bytes": "longer", "truncated_labels": "truncated",
                "not_28x28": "14x14", "label_10": "label 10"}[case]
    assert expected in msg


def test_count_mismatch_names_both_files(tmp_path):
    img, lab = _write_split(tmp_path / "fashion_mnist", labels=_labels_bytes([1, 2]))
    msg = _user_error(tmp_path)
    assert str(img) in msg and str(lab) in msg
    assert "3 images but 2 labels" in msg and "dataset-fashion-mnist" in msg


def test_corrupt_gzip_is_named(tmp_path):
    folder = tmp_path / "fashion_mnist"
    img, _ = _write_split(folder, gz=True)
    img.write_bytes(b"this is not gzip data")
    msg = _user_error(tmp_path)
    assert str(img) in msg and "dataset-fashion-mnist" in msg
    img.write_bytes(gzip.compress(_images_bytes(TRAIN_VALUES))[:-20])  # cut short
    msg = _user_error(tmp_path)
    assert str(img) in msg and "dataset-fashion-mnist" in msg


def test_missing_files_name_the_expected_folder(tmp_path, no_debian):
    msg = _user_error(tmp_path, train=False)
    assert "t10k-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    for folder in (tmp_path / "fashion_mnist", tmp_path / "fashion_mnist" / "raw",
                   tmp_path / "FashionMNIST" / "raw", no_debian):
        assert f"{folder}/" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    # Only the train files present: the test split is still missing.
    _write_split(tmp_path / "fashion_mnist", train=True)
    assert "t10k-images-idx3-ubyte" in _user_error(tmp_path, train=False)


def test_half_a_split_names_the_missing_file(tmp_path):
    folder = tmp_path / "fashion_mnist"
    img, lab = _write_split(folder, gz=True)
    lab.unlink()
    msg = _user_error(tmp_path)
    assert str(folder / "train-labels-idx1-ubyte") in msg and "dataset-fashion-mnist" in msg


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_debian_files(monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", REAL_DIR)
    train, test = FashionMNIST(None, train=True), FashionMNIST(None, train=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 28, 28)
    assert np.bincount(train.targets, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test.targets, minlength=10).tolist() == [1000] * 10
    img, label = train[0]
    assert img.mode == "RGB" and img.size == (28, 28) and 0 <= label <= 9
    assert train.images.max() > 200  # real pictures, not a blank file
