"""Linear probe of a pre-trained encoder, with facebookresearch/mae's linear-probe recipe (not in MAE-Lite).

MAE's `main_linprobe.py` defaults: BatchNorm1d(affine=False) + linear head on the frozen encoder's cls
token (`global_pool=True` for average-pooled patch tokens), LARS (momentum 0.9, trust 0.001) with lr
0.1 x batch / 256, weight decay 0, batch 16384, 90 epochs with 10 warm-up epochs, cosine to 0;
RandomResizedCrop (bicubic, scale 0.08-1) + horizontal flip only; eval Resize + CenterCrop.
Weights load as for fine-tuning (`--ckpt`, else <output_dir>/<pretrain_exp_name>/last_epoch_ckpt.pth.tar).
Outputs go to `<output_dir>/<pretrain_exp_name>/linprobe_eval`.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn as nn

from ..data import build_dataset
from ..data.transforms import pretrain_transform
from ..engine.optim import build_optimizer, param_groups
from ..errors import UserError
from ..methods.linprobe import LinearProbe, attach_probe_head
from .finetune import FinetuneMAE


class LinProbe(FinetuneMAE):
    name: ClassVar[str] = "linprobe"
    aliases: ClassVar[tuple[str, ...]] = ("linprobe_exp.py", "linprobe_exp")
    optimizers: ClassVar[tuple[str, ...]] = ("lars", "sgd", "adamw")

    save_folder_prefix: str = "linprobe_"
    global_pool: bool = False  # MAE's linear probe reads the cls token
    drop_path: float = 0.0
    # optimisation: LARS, lr 0.1 x batch / 256, wd 0, 10 warm-up epochs, cosine to 0
    opt: str = "lars"
    momentum: float = 0.9
    trust_coeff: float = 0.001
    batch_size: int = 16384
    max_epoch: int = 90
    warmup_epochs: int = 10
    basic_lr_per_img: float = 0.1 / 256
    weight_decay: float = 0.0
    min_lr: float = 0.0
    layer_decay: float = 1.0  # only the head trains
    # augmentation: RandomResizedCrop + flip only
    aa: Optional[str] = None
    color_jitter: Optional[float] = None
    reprob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None or self.smoothing > 0:
            raise UserError("the linear probe trains on plain labels: leave mixup, cutmix and smoothing at 0")
        if self.trust_coeff <= 0:
            raise UserError(f"trust_coeff must be > 0, got {self.trust_coeff}")

    def build_network(self) -> nn.Module:
        return attach_probe_head(super().build_network(), self.num_classes)

    def build_model(self) -> LinearProbe:
        return LinearProbe(self.build_network())

    def build_datasets(self) -> dict:
        tf = pretrain_transform(self.img_size, self.scale, self.ratio, self.train_interpolation, self.hflip, self.mean,
                                self.std, output="uint8")
        train = build_dataset(self.dataset, self.data_root, "train", tf, self.demo_samples)
        return {"train": self.limited(train, "train"), "eval": self.build_eval_dataset()}

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        groups = param_groups(model, self.weight_decay)  # only the head is trainable
        if self.opt.lower() != "lars":
            return build_optimizer(groups, self)
        from timm.optim import Lars

        for g in groups:  # as MAE's LARS: weight matrices adapt (even at wd 0), biases neither adapt nor decay
            g["always_adapt"] = all(p.ndim > 1 for p in g["params"])
        return Lars(groups, lr=self.scaled_lr, momentum=self.momentum, trust_coeff=self.trust_coeff)
