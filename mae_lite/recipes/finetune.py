"""Fine-tuning recipes of the original (fact sheet 4.4-4.6): MAE's default, "impr." and impr. + RPE.

Training from scratch is fine-tuning with no checkpoint (`pretrain_exp_name=scratch/...`), as in the
seed. Outputs go to `<output_dir>/<pretrain_exp_name>/<save_folder_prefix>eval`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Optional

import timm
import torch.nn as nn

from ..data import build_dataset
from ..data.transforms import erasing, eval_transform, finetune_transform
from ..engine.checkpoint import load_checkpoint, load_pretrained
from ..engine.log import LOGGER
from ..engine.optim import build_optimizer, layer_decay_scale, param_groups
from ..errors import UserError
from ..methods import Classify
from .base import Recipe
from .encoders import check_encoder_compatible


class FinetuneMAE(Recipe):
    """MAE's default fine-tuning recipe (`finetuning_mae_exp.py`)."""

    name: ClassVar[str] = "finetuning_mae"
    uint8_batches: ClassVar[bool] = True
    aliases: ClassVar[tuple[str, ...]] = ("finetuning_mae_exp.py", "finetuning_mae_exp")

    pretrain_exp_name: Optional[str] = None  # required: the pre-training run (or scratch/<name>)
    save_folder_prefix: str = "ft_mae_"
    # model
    encoder_arch: str = "vit_tiny_patch16"
    num_classes: int = 1000
    global_pool: bool = True
    drop_path: float = 0.1
    drop: float = 0.0
    attn_drop_rate: float = 0.0
    patch_size: Optional[int] = None
    depth: Optional[int] = None
    # load only the first N pre-trained blocks (the rest stay at initialisation; embeddings always load): None: all
    load_blocks: Optional[int] = None
    # optimisation: AdamW (0.9, 0.999), wd 0.05, lr 1e-3 x batch / 256, layer decay 0.85, 5 warm-up epochs, cosine to 1e-6
    batch_size: int = 1024
    max_epoch: int = 100
    layer_decay: float = 0.85
    min_lr: float = 1e-6
    # augmentation (timm): RandAugment, random erasing, mixup/cutmix, label smoothing
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: Optional[float] = 0.4  # inactive while RandAugment is on (as in the original)
    aa: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: Optional[tuple[float, float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    train_interpolation: str = "bicubic"
    crop_pct: float = 0.875
    demo_samples: int = 2048

    def validate(self) -> None:
        super().validate()
        if self.exp_name:
            raise UserError("fine-tuning recipes name their folder <pretrain_exp_name>/<save_folder_prefix>eval: "
                            "set pretrain_exp_name (and save_folder_prefix) instead of exp_name")
        if not 0 < self.layer_decay <= 1:
            raise UserError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.num_classes is not None and self.num_classes < 1:  # None: from the data set (transfer)
            raise UserError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.encoder_arch not in timm.list_models():
            raise UserError(f"unknown encoder_arch {self.encoder_arch!r}")
        if self.load_blocks is not None and self.load_blocks < 0:
            raise UserError(f"load_blocks must be >= 0 (or None for every block), got {self.load_blocks}")
        if self.decode_on_device:
            raise UserError("decode_on_device applies to pre-training (mae_lite, mae_lite_distill): fine-tuning's "
                            "RandAugment works on decoded PIL images in the loader workers; drop decode_on_device=True")

    @property
    def run_name(self) -> str:
        if not self.pretrain_exp_name:
            raise UserError("set pretrain_exp_name= (the pre-training run, e.g. mae_lite/mae_tiny_400e, "
                            "or scratch/vit_tiny to train from random initialisation)")
        return str(Path(self.pretrain_exp_name) / f"{self.save_folder_prefix}eval")

    def arch_record(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"img_size": self.img_size, "num_classes": self.num_classes,
                                  "global_pool": self.global_pool, **self.arch_overrides()}
        return {"name": self.encoder_arch, "kwargs": kwargs}

    def build_network(self) -> nn.Module:
        arch = self.arch_record()
        # the original's `drop` is timm's position + projection dropout (timm's drop_rate is head dropout)
        return timm.create_model(arch["name"], drop_path_rate=self.drop_path, pos_drop_rate=self.drop,
                                 proj_drop_rate=self.drop, attn_drop_rate=self.attn_drop_rate, **arch["kwargs"])

    def build_model(self) -> Classify:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        mixup = None
        if self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None:
            mixup = Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, cutmix_minmax=self.cutmix_minmax,
                          prob=self.mixup_prob, switch_prob=self.mixup_switch_prob, mode=self.mixup_mode,
                          label_smoothing=self.smoothing, num_classes=self.num_classes)
            criterion: nn.Module = SoftTargetCrossEntropy()
        elif self.smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(self.smoothing)
        else:
            criterion = nn.CrossEntropyLoss()
        return Classify(self.build_network(), criterion, mixup)

    def build_eval_dataset(self):
        eval_tf = eval_transform(self.img_size, self.crop_pct, "bicubic", self.mean, self.std, output="uint8")
        return self.limited(build_dataset(self.dataset, self.data_root, "eval", eval_tf, self.demo_samples), "eval")

    def build_datasets(self) -> dict:
        train_tf = finetune_transform(self.img_size, self.scale, self.ratio, self.hflip, self.color_jitter, self.aa,
                                      self.train_interpolation, self.reprob, self.remode, self.recount, self.mean,
                                      self.std, output="uint8")
        train = build_dataset(self.dataset, self.data_root, "train", train_tf, self.demo_samples)
        return {"train": self.limited(train, "train"), "eval": self.build_eval_dataset()}

    def device_batch(self, batch, device, train: bool = True):
        """Normalised on the device, then timm's random erasing there (training only), before mixup/cutmix."""
        images, target = super().device_batch(batch, device, train)
        if train and self.reprob > 0:
            if getattr(self, "_erasing", (None, None))[0] != device:
                self._erasing = (device, erasing(self.reprob, self.remode, self.recount, device))
            images = self._erasing[1](images)
        return images, target

    def build_optimizer(self, model: nn.Module):
        net = model.model
        skip = {f"model.{n}" for n in getattr(net, "no_weight_decay", lambda: set())()}
        scale = layer_decay_scale(len(net.blocks), self.layer_decay, prefix="model.")
        return build_optimizer(param_groups(model, self.weight_decay, skip=skip, lr_scale=scale), self)

    def pretrained_path(self, ckpt_path: Optional[str]) -> Path:
        return Path(ckpt_path) if ckpt_path else Path(self.output_dir) / str(self.pretrain_exp_name) / "last_epoch_ckpt.pth.tar"

    def load_initial_weights(self, model: nn.Module, ckpt_path: Optional[str]) -> Optional[str]:
        """`--ckpt`, else <output_dir>/<pretrain_exp_name>/last_epoch_ckpt.pth.tar; none: train from scratch."""
        path = self.pretrained_path(ckpt_path)
        if not path.is_file():
            if ckpt_path:
                raise UserError(f"--ckpt {ckpt_path}: no such file")
            LOGGER.info("notice: no checkpoint at %s: training from random initialisation (from scratch)", path)
            return None
        ckpt = load_checkpoint(path)
        check_encoder_compatible(ckpt.get("arch"), model.model, path)
        drop = ("decoder", "mask_token", "head")  # the head is always re-initialised
        depth, kept = len(model.model.blocks), ""
        if self.load_blocks is not None:
            if self.load_blocks > depth:
                raise UserError(f"load_blocks={self.load_blocks} exceeds the model's {depth} blocks; use 0..{depth}")
            drop += tuple(f"blocks.{i}." for i in range(self.load_blocks, depth))
        if self.load_blocks is not None and self.load_blocks < depth:
            kept = f"; load_blocks={self.load_blocks}: blocks {self.load_blocks}..{depth - 1} left at initialisation"
        report = load_pretrained(model.model, ckpt, prefix=self.weights_prefix, drop=drop, ema=self.weights_ema)
        return f"{path}: {report.summary}{kept}"


class Finetune(FinetuneMAE):
    """The paper's improved recipe "impr." (`finetuning_exp.py`)."""

    name: ClassVar[str] = "finetuning"
    aliases: ClassVar[tuple[str, ...]] = ("finetuning_exp.py", "finetuning_exp")
    max_epoch: int = 300
    save_folder_prefix: str = "ft_"
    drop_path: float = 0.0
    color_jitter: Optional[float] = 0.3
    aa: Optional[str] = "rand-m10-mstd0.5-inc1"
    reprob: float = 0.0
    mixup: float = 0.2
    cutmix: float = 0.0
    smoothing: float = 0.0


class FinetuneRPE(Finetune):
    """impr. with the relative-position-bias ViT (`finetuning_rpe_exp.py`)."""

    name: ClassVar[str] = "finetuning_rpe"
    aliases: ClassVar[tuple[str, ...]] = ("finetuning_rpe_exp.py", "finetuning_rpe_exp")
    encoder_arch: str = "vit_tiny_patch16_rpe"
    save_folder_prefix: str = "ft_impr_rpe_"

    def arch_record(self) -> dict[str, Any]:
        record = super().arch_record()
        record["kwargs"]["use_abs_pos_emb"] = True  # the original's RPE recipe (its factory default is False)
        return record
