"""ADE20K (SceneParsing, 150 classes) in the published `ADEChallengeData2016` layout, and mmseg's pipelines.

`<data_root>/ade/ADEChallengeData2016/{images,annotations}/{training,validation}` holds `*.jpg` images and
`*.png` label maps of the same name (0 = "other", 1..150 = classes). Labels are read with
`reduce_zero_label` as mmseg's ADE20KDataset: 0 -> 255 (ignored), the others -1.

Train (mmseg's ADE20K config): RandomResize of (2048, 512) with ratio 0.5-2.0 keeping the aspect ratio,
RandomCrop 512 with cat_max_ratio 0.75, horizontal flip 0.5, PhotoMetricDistortion, then normalisation and
padding to the crop (image 0 after normalisation, label 255). Eval: resize to (2048, 512) keeping the ratio,
normalise; the label stays at its original size (predictions are resized to it). OpenCV does the resizing and
the HSV conversions, as mmcv does, on BGR images.
"""
from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .._optional import require
from ..errors import UserError

IGNORE = 255
SPLITS = {"train": "training", "eval": "validation"}
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")


def ade_folders(data_root: str | Path, split: str) -> tuple[Path, Path]:
    """(images, annotations) folders of a split, or one line saying what to put where."""
    base = Path(data_root) / "ade" / "ADEChallengeData2016"
    folder = SPLITS[split]
    img_dir, ann_dir = base / "images" / folder, base / "annotations" / folder
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise UserError(f"ADE20K: no folder {d}; unzip the official ADEChallengeData2016.zip into "
                            f"{Path(data_root) / 'ade'} so that it holds ADEChallengeData2016/images/{folder}/*.jpg "
                            f"and ADEChallengeData2016/annotations/{folder}/*.png (or set data_root=)")
    return img_dir, ann_dir


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label on uint8 maps: 0 -> 255, others -1 (255 stays 255)."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE
    out[label == IGNORE] = IGNORE
    return out.astype(np.uint8)


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale);
    returns (new_h, new_w), rounded as mmcv (int(x + 0.5))."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@functools.cache
def _cv2() -> ModuleType:
    """OpenCV on first use (the `segmentation` extra), one thread per loader worker as mmengine sets it (no
    oversubscription); forked workers inherit both."""
    cv2 = require("cv2", "ADE20K segmentation")
    cv2.setNumThreads(0)
    return cv2


def resize_pair(img: np.ndarray, label: Optional[np.ndarray], scale: tuple[int, int]):
    cv2 = _cv2()
    h, w = rescale_size(img.shape[0], img.shape[1], scale)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    return img, label


def random_crop(img: np.ndarray, label: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator):
    """mmseg's RandomCrop: up to 10 redraws until no class (ignore excluded) covers cat_max_ratio of the crop
    and at least two classes are present; else the 11th draw is used."""

    def draw() -> tuple[int, int]:
        return (int(rng.integers(0, max(img.shape[0] - crop, 0) + 1)),
                int(rng.integers(0, max(img.shape[1] - crop, 0) + 1)))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            cnt = np.bincount(label[y:y + crop, x:x + crop].ravel(), minlength=256)[:IGNORE]  # uint8: O(n)
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness: int = 32,
                           contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                           hue: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a BGR uint8 image: each step with probability 1/2; brightness, then
    contrast first or last (one coin), saturation and hue in OpenCV's uint8 HSV (hue in 0..179)."""
    cv2 = _cv2()
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness, brightness))
    contrast_first = rng.integers(2) == 1
    if contrast_first and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*saturation))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + int(rng.integers(-hue, hue))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not contrast_first and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast))
    return img


def to_tensor(img_bgr: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """BGR uint8 [H, W, 3] -> normalised RGB float [3, H, W] (mean/std in 0..1 units)."""
    scale = 1.0 / (255.0 * np.asarray(std[::-1], np.float32))  # BGR order, flipped at the end
    shift = np.asarray(mean[::-1], np.float32) / np.asarray(std[::-1], np.float32)
    x = img_bgr.astype(np.float32) * scale - shift
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[::-1]))


class SegTrainTransform:
    """The training pipeline; its randomness comes from torch's generator (seeded per loader worker)."""

    def __init__(self, crop: int, scale: tuple[int, int], ratio_range: tuple[float, float], cat_max_ratio: float,
                 hflip: float, photometric: bool, mean, std):
        self.crop, self.scale, self.ratio_range, self.cat_max_ratio = crop, scale, ratio_range, cat_max_ratio
        self.hflip, self.photometric, self.mean, self.std = hflip, photometric, mean, std

    def __call__(self, img: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))
        ratio = rng.uniform(*self.ratio_range)
        img, label = resize_pair(img, label, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        img, label = random_crop(img, label, self.crop, self.cat_max_ratio, rng)
        if rng.random() < self.hflip:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(np.ascontiguousarray(img), rng)
        x = to_tensor(img, self.mean, self.std)
        y = torch.from_numpy(np.ascontiguousarray(label)).long()
        pad_h, pad_w = self.crop - x.shape[1], self.crop - x.shape[2]  # crops of images smaller than the crop
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            y = torch.nn.functional.pad(y, (0, pad_w, 0, pad_h), value=IGNORE)
        return x, y


class SegEvalTransform:
    def __init__(self, scale: tuple[int, int], mean, std):
        self.scale, self.mean, self.std = scale, mean, std

    def __call__(self, img: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img, _ = resize_pair(img, None, self.scale)
        return to_tensor(img, self.mean, self.std), torch.from_numpy(label).long()


class ADE20K(Dataset):
    """(image, label) pairs of one split; `transform(img_bgr_uint8, label_uint8)` makes the tensors."""

    def __init__(self, data_root: str | Path, split: str, transform):
        _cv2()  # in this process, before the loader's workers: a missing OpenCV is one line, not a worker's traceback
        img_dir, ann_dir = ade_folders(data_root, split)
        self.images = sorted(img_dir.glob("*.jpg"))
        if not self.images:
            raise UserError(f"ADE20K: no .jpg images in {img_dir}; unzip ADEChallengeData2016.zip there")
        self.labels = [ann_dir / f"{p.stem}.png" for p in self.images]
        missing = [p for p in self.labels if not p.is_file()]
        if missing:
            raise UserError(f"ADE20K: {len(missing)} images in {img_dir} have no label map in {ann_dir} "
                            f"(e.g. {missing[0].name}); restore the annotations from ADEChallengeData2016.zip")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        cv2 = _cv2()
        img = cv2.imread(str(self.images[i]), cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f"ADE20K: cannot decode {self.images[i]}")
        label = np.array(Image.open(self.labels[i]))
        if label.ndim != 2 or label.shape != img.shape[:2]:
            raise UserError(f"ADE20K: {self.labels[i]} is not a single-channel map of its image's size "
                            f"{img.shape[:2]} (got {label.shape})")
        return img, reduce_zero_label(label)

    def __getitem__(self, i: int):
        return self.transform(*self.read(i))


class RepeatToLength(Dataset):
    """A dataset repeated (index modulo its size) to `length` items: an "epoch" of a fixed number of iterations
    for iteration-based recipes (every image appears length // n or length // n + 1 times per epoch)."""

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]


def collate_segmentation(batch: list) -> tuple:
    """Stacked (images, labels) when all items have one size (training crops), else lists (eval images)."""
    images, labels = [b[0] for b in batch], [b[1] for b in batch]
    if len({im.shape for im in images}) == 1 and len({lb.shape for lb in labels}) == 1:
        return torch.stack(images), torch.stack(labels)
    return images, labels
