"""Fashion-MNIST read from its four standard IDX files; nothing is ever downloaded.

The files are small enough to decode once and keep in memory as uint8, so data
loader workers never touch the disk. They are looked for in the layouts people
already have: our own ``<root>/fashion_mnist/``, torchvision's ``raw/`` folders,
and the folder of Debian's ``dataset-fashion-mnist`` package.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError

__all__ = ["FashionMNIST", "CLASSES", "DEBIAN_DIR", "candidate_dirs"]

# Label k is CLASSES[k], as in the dataset's own documentation.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# Where `apt-get install dataset-fashion-mnist` puts the (gzipped) files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_SIDE = 28

PathLike = Union[str, Path]


def candidate_dirs(root: Optional[PathLike]) -> list[Path]:
    """Folders searched, in order; the first holding both files of the split wins."""
    dirs = []
    if root is not None:
        base = Path(root).expanduser()
        dirs += [base / "fashion_mnist", base / "fashion_mnist" / "raw", base / "FashionMNIST" / "raw"]
    dirs.append(DEBIAN_DIR)  # read at call time, so tests can point it elsewhere
    return dirs


def _how_to_get(root: Optional[PathLike]) -> str:
    where = f"{Path(root).expanduser() / 'fashion_mnist'}/" if root is not None else "<data_root>/fashion_mnist/"
    return (f"get the data with `apt-get install dataset-fashion-mnist`, "
            f"or put the four IDX files (plain or .gz) under {where}")


def _find(folder: Path, name: str) -> Optional[Path]:
    """The plain file if present, else the gzipped one, else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"Fashion-MNIST file {path} cannot be read ({detail}); {fix}") from None


def _header(data: bytes, n_fields: int, path: Path, fix: str) -> list[int]:
    """The big-endian uint32 fields that start every IDX file (magic first)."""
    if len(data) < 4 * n_fields:
        raise UserError(f"Fashion-MNIST file {path} is truncated: {len(data)} bytes, "
                        f"shorter than its {4 * n_fields}-byte IDX header; {fix}")
    return [int(v) for v in np.frombuffer(data, dtype=">u4", count=n_fields)]


def _check_magic(magic: int, expected: int, path: Path, fix: str) -> None:
    if magic != expected:
        raise UserError(f"Fashion-MNIST file {path} has IDX magic number {magic}, expected {expected}; "
                        f"it is not a valid {'image' if expected == _IMAGES_MAGIC else 'label'} file; {fix}")


def _check_length(data: bytes, header: int, body: int, path: Path, fix: str) -> None:
    if len(data) != header + body:
        state = "truncated" if len(data) < header + body else "longer than its header says"
        raise UserError(f"Fashion-MNIST file {path} is {state}: {len(data)} bytes, "
                        f"its header implies {header + body}; {fix}")


def read_idx_images(path: Path, fix: str) -> np.ndarray:
    """Images file -> uint8 array [N, 28, 28], after checking magic and length."""
    data = _read_bytes(path, fix)
    magic, n, rows, cols = _header(data, 4, path, fix)
    _check_magic(magic, _IMAGES_MAGIC, path, fix)
    if (rows, cols) != (_SIDE, _SIDE):
        raise UserError(f"Fashion-MNIST file {path} holds {rows}x{cols} images, expected "
                        f"{_SIDE}x{_SIDE}; {fix}")
    _check_length(data, 16, n * rows * cols, path, fix)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: Path, fix: str) -> np.ndarray:
    """Labels file -> int64 array [N], after checking magic, length and range 0..9."""
    data = _read_bytes(path, fix)
    magic, n = _header(data, 2, path, fix)
    _check_magic(magic, _LABELS_MAGIC, path, fix)
    _check_length(data, 8, n, path, fix)
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)
    bad = np.flatnonzero(labels >= len(CLASSES))
    if bad.size:
        raise UserError(f"Fashion-MNIST file {path} has label {labels[bad[0]]} at index {bad[0]}, "
                        f"expected 0..{len(CLASSES) - 1}; {fix}")
    return labels


class FashionMNIST(Dataset):
    """Fashion-MNIST train (60000) or test (10000) split, held in memory.

    Item ``i`` is ``(transform(img), label)``: ``img`` is a PIL RGB image with the
    grey level copied to all three channels, so the RGB transforms and models used
    for natural images apply unchanged. ``limit`` keeps the first ``limit`` images
    (a quick run's subset; class-balanced subsets are built elsewhere).
    """

    def __init__(self, root: Optional[PathLike], train: bool = True,
                 transform: Optional[Callable] = None, limit: Optional[int] = None):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                                  or limit < 1):
            raise UserError(f"Fashion-MNIST limit must be a positive integer or None, got {limit!r}")
        self.root = root
        self.train = bool(train)
        self.transform = transform
        self.classes = list(CLASSES)
        self.images_file, self.labels_file = self._locate(root, self.train)
        self.folder = self.images_file.parent
        fix = _how_to_get(root)
        images = read_idx_images(self.images_file, fix)
        labels = read_idx_labels(self.labels_file, fix)
        if len(images) != len(labels):
            raise UserError(f"Fashion-MNIST files {self.images_file} and {self.labels_file} disagree: "
                            f"{len(images)} images but {len(labels)} labels; {fix}")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        # Copies own their memory: the decoded file buffer is freed and the arrays are writable.
        self.images = np.ascontiguousarray(images).copy()
        self.targets = labels.astype(np.int64, copy=True)

    @staticmethod
    def _locate(root: Optional[PathLike], train: bool) -> tuple[Path, Path]:
        """The images and labels files of the split, from the first folder holding both."""
        images_name, labels_name = _FILES[train]
        dirs = candidate_dirs(root)
        half = None
        for folder in dirs:
            images, labels = _find(folder, images_name), _find(folder, labels_name)
            if images is not None and labels is not None:
                return images, labels
            if half is None and (images is not None or labels is not None):
                half = (folder, labels_name if images is not None else images_name)
        fix = _how_to_get(root)
        if half is not None:
            folder, missing = half
            raise UserError(f"Fashion-MNIST file {folder / missing}[.gz] not found next to its partner "
                            f"in {folder}/; {fix}")
        split = "train" if train else "test"
        raise UserError(f"Fashion-MNIST {split} split not found: expected {images_name}[.gz] and "
                        f"{labels_name}[.gz] in one of {', '.join(f'{d}/' for d in dirs)}; {fix}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert("RGB")
        label = int(self.targets[index])
        if self.transform is None:
            return img, label
        return self.transform(img), label

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"FashionMNIST({split}, {len(self)} images from {self.folder})"
