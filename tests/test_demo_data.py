"""The bundled demo photos and the DemoPhotos dataset (CPU, a few seconds)."""
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from mae_lite.data import demo
from mae_lite.data.demo import DEMO_DIR, DemoPhotos, list_demo_photos

CROP = transforms.Compose([transforms.RandomResizedCrop(32), transforms.ToTensor()])


def _licence_rows():
    text = (DEMO_DIR / "LICENSES.md").read_text(encoding="utf-8")
    return re.findall(r"^\|\s*`?([\w.-]+\.jpg)`?\s*\|", text, flags=re.MULTILINE)


def test_photo_count_matches_licences():
    photos = list_demo_photos()
    assert len(photos) >= 12
    assert photos == sorted(photos)
    rows = _licence_rows()
    assert len(rows) == len(set(rows)), "a file is listed twice in LICENSES.md"
    assert set(rows) == {p.name for p in photos}


def test_photos_are_rgb_256_and_not_flat():
    for path in list_demo_photos():
        with Image.open(path) as im:
            assert im.format == "JPEG", path.name
            assert im.mode == "RGB", path.name
            assert max(im.size) == 256, path.name
            pixels = np.asarray(im, dtype=np.float64).reshape(-1, 3)
        assert (pixels.std(axis=0) > 10).all(), f"{path.name} is nearly constant"


def test_dataset_length_labels_and_classes():
    ds = DemoPhotos(samples_per_epoch=50)
    n = len(list_demo_photos())
    assert len(ds) == 50
    assert ds.classes == [p.stem for p in list_demo_photos()]
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [i % n for i in range(50)]
    assert all(type(label) is int for label in labels)
    img, _ = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    with pytest.raises(IndexError):
        ds[50]


def test_dataset_returns_crops_of_the_right_shape():
    ds = DemoPhotos(transform=CROP, samples_per_epoch=20)
    for i in range(len(ds)):
        x, label = ds[i]
        assert isinstance(x, torch.Tensor)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert label == i % len(ds.classes)


def test_pickles_cleanly():
    ds = DemoPhotos(transform=CROP, samples_per_epoch=8)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.classes == ds.classes and len(clone) == len(ds)
    assert np.array_equal(np.asarray(clone.photos[3]), np.asarray(ds.photos[3]))


@pytest.mark.parametrize("context", [None, "spawn"])
def test_dataloader_with_workers(context):
    ds = DemoPhotos(transform=CROP, samples_per_epoch=24)
    loader = DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    assert len(batches) == 3
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (24, 3, 32, 32)
    assert y.tolist() == [i % len(ds.classes) for i in range(24)]


def test_missing_photos_raise(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        DemoPhotos()
