"""A small set of real colour photos shipped with the package.

It lets examples, smoke tests and CI runs pre-train on natural images without
downloading a dataset. Sources and licences: ``demo/LICENSES.md``.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DEMO_DIR", "list_demo_photos", "DemoPhotos"]

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def list_demo_photos() -> list[Path]:
    """Paths of the bundled photos, sorted so that labels are stable."""
    return sorted(DEMO_DIR.glob("*.jpg"))


class DemoPhotos(Dataset):
    """Cycles over the demo photos; the caller's transform supplies the randomness.

    Item ``i`` is ``(transform(photo), label)`` with ``label = i % n_photos``, so
    the dataset itself is deterministic and a random-crop transform turns a few
    photos into as many distinct samples as ``samples_per_epoch`` asks for.
    """

    def __init__(self, transform=None, samples_per_epoch: int = 2048):
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        paths = list_demo_photos()
        if not paths:
            raise FileNotFoundError(f"no demo photos (*.jpg) found in {DEMO_DIR}")
        # Decoded once and kept in memory: the set is tiny and workers then never touch the disk.
        self.photos = []
        for path in paths:
            with Image.open(path) as im:
                self.photos.append(im.convert("RGB"))
        self._classes = [p.stem for p in paths]
        self.transform = transform
        self.samples_per_epoch = int(samples_per_epoch)

    @property
    def classes(self) -> list[str]:
        """Photo names (file stems); label ``k`` is ``classes[k]``."""
        return list(self._classes)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int):
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index {index} out of range for {self.samples_per_epoch} samples")
        label = index % len(self.photos)
        photo = self.photos[label]
        if self.transform is None:
            return photo.copy(), label  # a copy, so callers cannot alter the cached photo
        return self.transform(photo), label
