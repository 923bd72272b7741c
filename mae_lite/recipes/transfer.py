"""Transfer classification (fact sheet 4.8, the original's `finetuning_transfer_exp.py`): fine-tuning on a small
data set with SGD (Nesterov 0.9, no weight decay, gradient clipping 1.0), lr 0.03 x batch / 512, 20 warm-up
epochs, layer decay 0.75, RandomResizedCrop + flip only and plain cross-entropy, at 224 px.

Beyond the original: `num_classes` follows the data set unless given, `class_type` picks Aircraft's
variant/family/manufacturer (or CIFAR-100 coarse, iNat taxonomy levels), and `few_shot=K` keeps K training
images per class, chosen by `few_shot_seed` and written to `<output folder>/few_shot.json` and the log.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch.utils.data import Subset

from ..data import build_dataset
from ..data.transfer_fewshot import few_shot_indices
from ..data.transfer_sets import CANONICAL, TRANSFER_SETS, class_types, is_transfer_set
from ..data.transforms import eval_transform, finetune_transform
from ..engine.log import LOGGER
from ..errors import UserError
from .finetune import FinetuneMAE

WITH_CLASS_TYPES = [CANONICAL[k] for k, info in TRANSFER_SETS.items() if info.class_types != ("",)]


class FinetuneTransfer(FinetuneMAE):
    """`finetuning_transfer_exp.py`: one recipe for CIFAR-10/100, Flowers, Pets, Aircraft, Cars (and iNat)."""

    name: ClassVar[str] = "finetuning_transfer"
    aliases: ClassVar[tuple[str, ...]] = ("finetuning_transfer_exp.py", "finetuning_transfer_exp")

    dataset: str = "CIFAR100"
    class_type: str = ""  # "": the data set's default (Aircraft: variant; CIFAR100: fine; iNat2018: name)
    num_classes: Optional[int] = None  # None: the data set's class count (10/100/102/37/100/196)
    few_shot: Optional[int] = None  # K: keep K training images per class
    few_shot_seed: int = 0  # picks the K images; independent of `seed`, so training seeds share one subset
    save_folder_prefix: str = ""  # "": ft_<dataset>_[<class_type>_][<K>shot_] (ft_cifar100_ as the original)
    max_epoch: int = 300
    batch_size: int = 512
    eval_interval: int = 10
    # SGD Nesterov 0.9, no weight decay, clip 1.0; lr 0.03 x batch / 512; 20 warm-up epochs; cosine to 1e-6
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_grad: Optional[float] = 1.0
    basic_lr_per_img: float = 0.03 / 512
    warmup_epochs: int = 20
    layer_decay: float = 0.75
    drop_path: float = 0.0
    # RandomResizedCrop (bicubic) + flip only; plain cross-entropy
    color_jitter: Optional[float] = None
    aa: Optional[str] = None
    reprob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.few_shot is not None and self.few_shot < 1:
            raise UserError(f"few_shot must be >= 1 images per class (or None for all), got {self.few_shot}")
        if self.few_shot_seed < 0:
            raise UserError(f"few_shot_seed must be >= 0, got {self.few_shot_seed}")
        if is_transfer_set(self.dataset):
            allowed = [c for c in class_types(self.dataset) if c]
            if self.class_type and self.class_type not in allowed:
                raise UserError(f"class_type={self.class_type!r} does not apply to {CANONICAL[self.dataset.lower()]}; "
                                f"choices: {', '.join(allowed) or 'none (leave it empty)'}")
        elif self.class_type:
            raise UserError(f"class_type applies to {', '.join(WITH_CLASS_TYPES)}, not dataset={self.dataset}; "
                            "leave it empty")

    # ----- output folder ------------------------------------------------------------------------
    @property
    def folder_prefix(self) -> str:
        if self.save_folder_prefix:
            return self.save_folder_prefix
        data = "folder" if self.dataset.startswith("folder:") else self.dataset.lower()
        kind = f"{self.class_type}_" if self.class_type else ""
        shots = f"{self.few_shot}shot_" if self.few_shot else ""
        return f"ft_{data}_{kind}{shots}"

    @property
    def run_name(self) -> str:
        FinetuneMAE.run_name.fget(self)  # refuses a missing pretrain_exp_name
        return str(Path(str(self.pretrain_exp_name)) / f"{self.folder_prefix}eval")

    # ----- classes ------------------------------------------------------------------------------
    def data_classes(self, train_split: Optional[torch.utils.data.Dataset] = None) -> list[str]:
        """The training split's class names (read once per data set and class type)."""
        cache = self.__dict__.setdefault("_classes", {})
        key = (self.dataset, self.data_root, self.class_type)
        if key not in cache:
            ds = train_split
            if ds is None:
                ds = build_dataset(self.dataset, self.data_root, "train", None, self.demo_samples, self.class_type)
            classes = getattr(ds, "classes", None)
            if classes is None:
                raise UserError(f"dataset {self.dataset} does not list its classes: set num_classes=")
            cache[key] = list(classes)
        return cache[key]

    @property
    def resolved_num_classes(self) -> int:
        return self.num_classes if self.num_classes is not None else len(self.data_classes())

    def arch_record(self) -> dict[str, Any]:
        record = super().arch_record()
        record["kwargs"]["num_classes"] = self.resolved_num_classes
        return record

    def build_model(self):
        method = super().build_model()
        if method.mixup is not None:  # only when mixup/cutmix are switched on by an override
            method.mixup.num_classes = self.resolved_num_classes
        return method

    # ----- data ---------------------------------------------------------------------------------
    def build_eval_dataset(self):
        tf = eval_transform(self.img_size, self.crop_pct, "bicubic", self.mean, self.std, output="uint8")
        ds = build_dataset(self.dataset, self.data_root, "eval", tf, self.demo_samples, self.class_type)
        return self.limited(ds, "eval")

    def build_datasets(self) -> dict:
        train_tf = finetune_transform(self.img_size, self.scale, self.ratio, self.hflip, self.color_jitter, self.aa,
                                      self.train_interpolation, self.reprob, self.remode, self.recount, self.mean,
                                      self.std, output="uint8")
        train = build_dataset(self.dataset, self.data_root, "train", train_tf, self.demo_samples, self.class_type)
        classes = self.data_classes(train)
        if self.num_classes is not None and self.num_classes < len(classes):
            raise UserError(f"num_classes={self.num_classes} is below the {len(classes)} classes of {self.dataset}; "
                            "leave num_classes unset to follow the data set")
        LOGGER.info("%s: %d classes, %d training images%s", self.dataset, len(classes), len(train),
                    "" if self.num_classes is None else f" (head of num_classes={self.num_classes})")
        if self.few_shot:
            train = self.few_shot_subset(train, classes)
        return {"train": self.limited(train, "train"), "eval": self.build_eval_dataset()}

    def few_shot_subset(self, train: torch.utils.data.Dataset, classes: list[str]) -> Subset:
        """K images per class of `train`; the choice goes to the log and to <output folder>/few_shot.json."""
        targets = getattr(train, "targets", None)
        if targets is None:
            raise UserError(f"few_shot needs a data set that lists its labels; {self.dataset} does not")
        chosen = few_shot_indices(targets, self.few_shot, self.few_shot_seed)
        indices = sorted(i for idx in chosen.values() for i in idx)
        short = sorted(classes[c] for c, idx in chosen.items() if len(idx) < self.few_shot)
        path = self.output_path / "few_shot.json"
        LOGGER.info("few_shot=%d (few_shot_seed %d): kept %d of %d training images%s; recorded in %s; indices %s",
                    self.few_shot, self.few_shot_seed, len(indices), len(targets),
                    f" ({len(short)} classes have fewer than {self.few_shot}: {', '.join(short[:5])})" if short else "",
                    path, indices)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            files = getattr(train, "files", None)
            record = {"dataset": self.dataset, "class_type": self.class_type, "few_shot": self.few_shot,
                      "few_shot_seed": self.few_shot_seed, "train_images": len(targets), "kept": len(indices),
                      "indices": indices, "per_class": {classes[c]: idx for c, idx in chosen.items()},
                      **({"files": [str(files[i]) for i in indices]} if files is not None else {})}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))
        return Subset(train, indices)
