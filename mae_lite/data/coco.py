"""COCO 2017 instances for detection transfer, and ViTDet's large-scale-jitter augmentation.

Layout: `<data_root>/coco/{train2017,val2017}/*.jpg` and `<data_root>/coco/annotations/instances_{train,val}2017.json`.
Training items are (float image [3, h, w] in [0, 1] after jitter, {"boxes" xyxy, "labels" 1..80,
"masks" uint8 [N, h, w], "image_id"}); eval items are the unchanged image and {"image_id"}, so the model
resizes it and maps its detections back to the original size. Labels are the sorted category ids
numbered from 1 (0 is torchvision's background); `label_to_cat` maps them back for COCO results.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from .._optional import require
from ..errors import UserError

if TYPE_CHECKING:
    from pycocotools.coco import COCO

FEATURE = "COCO detection"  # what needs pycocotools, in the message when it is missing
SPLITS = {"train": "train2017", "eval": "val2017"}


def coco_files(data_root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split; a missing one is a one-line error naming it."""
    folder = SPLITS[split]
    root = Path(data_root) / "coco"
    images, ann = root / folder, root / "annotations" / f"instances_{folder}.json"
    for path in (ann, images):
        if not path.exists():
            raise UserError(f"COCO file missing: {path} (put COCO 2017 at <data_root>/coco/{{train2017,val2017,"
                            "annotations/instances_{train,val}2017.json}}, or set data_root=)")
    return images, ann


def load_coco(ann_file: str | Path) -> COCO:
    api = require("pycocotools.coco", FEATURE)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        try:
            return api.COCO(str(ann_file))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read COCO annotations {ann_file}: {type(e).__name__}: {e}".splitlines()[0]) from None


class CocoDetection(Dataset):
    """COCO instances of one split. Training drops crowd annotations and images left without any
    (as detectron2); `transform(image uint8, segmentations, labels) -> (image, target)` augments them."""

    def __init__(self, data_root: str | Path, split: str, transform: Optional[Any] = None):
        self.split, self.transform = split, transform
        self.image_dir, ann_file = coco_files(data_root, split)
        self.coco = load_coco(ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i: c for c, i in self.cat_to_label.items()}
        ids = sorted(self.coco.getImgIds())
        if split == "train":
            ids = [i for i in ids if self._instances(i)]
        self.ids = ids

    def _instances(self, image_id: int) -> list[dict]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        return [a for a in anns if a.get("segmentation") and a["category_id"] in self.cat_to_label]

    def __len__(self) -> int:
        return len(self.ids)

    def read_image(self, image_id: int) -> torch.Tensor:
        info = self.coco.loadImgs(image_id)[0]
        with Image.open(self.image_dir / info["file_name"]) as img:
            return TF.pil_to_tensor(img.convert("RGB"))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        image = self.read_image(image_id)
        if self.split != "train" or self.transform is None:
            return image.float() / 255, {"image_id": torch.tensor(image_id)}
        anns = self._instances(image_id)
        labels = [self.cat_to_label[a["category_id"]] for a in anns]
        image, target = self.transform(image, [a["segmentation"] for a in anns], labels)
        target["image_id"] = torch.tensor(image_id)
        return image, target


def _rle(seg: Any, h: int, w: int) -> dict:
    """One RLE of a polygon list or an (uncompressed) RLE annotation."""
    mask_utils = require("pycocotools.mask", FEATURE)
    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6]  # pycocotools needs 3 points
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w)) if polys else mask_utils.encode(
            np.zeros((h, w), dtype=np.uint8, order="F"))
    return mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg


class LargeScaleJitter:
    """ViTDet's training augmentation: horizontal flip, resize so that the image fits a square of
    `size` x U(scale) (aspect kept), then a random crop of at most `size` x `size` (no padding; the
    model pads). Polygons are moved with the image and rasterised at the final size; boxes are the
    tight boxes of the resulting masks, and instances cropped away are dropped."""

    def __init__(self, size: int = 640, scale: tuple[float, float] = (0.1, 2.0), hflip: float = 0.5):
        self.size, self.scale, self.hflip = size, scale, hflip

    def __call__(self, image: torch.Tensor, segs: list[Any], labels: list[int]):
        _, h, w = image.shape
        flip = torch.rand(()).item() < self.hflip
        r = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(()).item()
        s = min(self.size * r / h, self.size * r / w)
        nh, nw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
        oy = int(max(nh - self.size, 0) * torch.rand(()).item() + 0.5)
        ox = int(max(nw - self.size, 0) * torch.rand(()).item() + 0.5)
        ch, cw = min(nh, self.size), min(nw, self.size)
        if flip:
            image = image.flip(-1)
        image = TF.resize(image, [nh, nw], antialias=True)[:, oy:oy + ch, ox:ox + cw]

        mask_utils = require("pycocotools.mask", FEATURE)
        masks = []
        for seg in segs:
            if isinstance(seg, list):  # polygons: move the points, rasterise at the crop size
                moved = []
                for p in seg:
                    xy = np.asarray(p, dtype=np.float64).reshape(-1, 2)
                    if flip:
                        xy[:, 0] = w - xy[:, 0]
                    xy = xy * (nw / w, nh / h) - (ox, oy)
                    moved.append(xy.reshape(-1).tolist())
                masks.append(torch.from_numpy(mask_utils.decode(_rle(moved, ch, cw))))
            else:  # a run-length mask: move the pixels
                m = torch.from_numpy(mask_utils.decode(_rle(seg, h, w)))
                m = m.flip(-1) if flip else m
                m = F.interpolate(m[None, None].float(), size=(nh, nw), mode="nearest")[0, 0]
                masks.append(m[oy:oy + ch, ox:ox + cw].to(torch.uint8))
        mask_t = torch.stack(masks) if masks else torch.zeros(0, ch, cw, dtype=torch.uint8)
        keep = mask_t.flatten(1).amax(1) > 0 if len(masks) else torch.zeros(0, dtype=torch.bool)
        mask_t = mask_t[keep]
        target = {"boxes": masks_to_boxes(mask_t), "labels": torch.tensor(labels, dtype=torch.int64)[keep],
                  "masks": mask_t}
        return image.float() / 255, target


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes [N, 4] around the pixels of each binary mask (pixel edges, so a 1-pixel mask is 1 wide)."""
    if not len(masks):
        return torch.zeros(0, 4)
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[1:]
    y0 = rows.float().argmax(1)
    y1 = h - rows.flip(1).float().argmax(1)
    x0 = cols.float().argmax(1)
    x1 = w - cols.flip(1).float().argmax(1)
    return torch.stack([x0, y0, x1, y1], 1).float()


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images of different sizes stay a list (the model pads them); targets a list of dicts."""
    images, targets = zip(*batch)
    return list(images), list(targets)
