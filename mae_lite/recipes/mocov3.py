"""MoCo-v3 pre-training baseline, `projects/mocov3/mocov3_exp.py` of the original (fact sheet 4.9).

Fine-tune the result with `-f finetuning --exp-options weights_prefix=base_encoder layer_decay=0.75`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import timm
import torch
import torch.distributed as dist
import torch.nn as nn

from ..data import build_dataset
from ..data.ssl_transforms import ssl_transform
from ..engine.optim import build_optimizer
from ..errors import UserError
from ..methods.mocov3 import MoCoV3
from ..models.mocov3 import MOCOV3_ARCHS
from .base import Recipe


class MoCoV3Recipe(Recipe):
    uint8_batches: ClassVar[bool] = True
    name: ClassVar[str] = "mocov3"
    aliases: ClassVar[tuple[str, ...]] = ("mocov3_exp.py", "mocov3_exp")

    # model: ViT-Tiny (12 heads, frozen sin-cos positions, cls-token output), 3-layer projector, 2-layer predictor
    encoder_arch: str = "mocov3_vit_tiny_patch16"
    patch_size: Optional[int] = None  # None: the architecture's own (16)
    depth: Optional[int] = None  # None: the architecture's own (12)
    stop_grad_conv1: bool = False
    moco_dim: int = 256  # projector / predictor output
    moco_mlp_dim: int = 4096  # projector / predictor hidden width
    moco_m: float = 0.99  # momentum at step 0, raised to 1 by a cosine over all iterations
    moco_t: float = 0.2  # softmax temperature
    # schedule and optimiser: AdamW (0.9, 0.999) with weight decay 0.1 on every parameter, lr 1.5e-4 x batch / 256,
    # 40 warm-up epochs from 1e-6, cosine to 0
    batch_size: int = 1024
    max_epoch: int = 400
    weight_decay: float = 0.1
    basic_lr_per_img: float = 1.5e-4 / 256
    warmup_epochs: int = 40
    warmup_lr: float = 1e-6
    num_workers: int = 6
    # data: two asymmetric views (ssl_transform)
    scale: tuple[float, float] = (0.08, 1.0)
    demo_samples: int = 2048  # images per epoch drawn from the embedded photos (dataset=demo)
    # initial weights (ssl_train --ckpt): loaded into the base encoder, then copied to the momentum encoder
    weights_prefix: str = "base_encoder"

    def validate(self) -> None:
        super().validate()
        if self.decode_on_device:
            raise UserError("decode_on_device applies to mae_lite / mae_lite_distill: MoCo-v3's colour jitter, blur "
                            "and solarisation work on decoded PIL images in the loader workers; drop decode_on_device=True")
        if self.encoder_arch not in MOCOV3_ARCHS:
            raise UserError(f"encoder_arch {self.encoder_arch!r} is not a MoCo-v3 ViT; use one of {', '.join(MOCOV3_ARCHS)}")
        for key in ("moco_dim", "moco_mlp_dim"):
            if getattr(self, key) < 1:
                raise UserError(f"option '{key}' must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.moco_m <= 1.0:
            raise UserError(f"moco_m is the starting momentum, in [0, 1]; got {self.moco_m}")
        if self.moco_t <= 0:
            raise UserError(f"moco_t is the softmax temperature and must be > 0, got {self.moco_t}")
        patch = self.patch_size or MOCOV3_ARCHS[self.encoder_arch]["patch_size"]
        if self.img_size % patch:
            raise UserError(f"img_size {self.img_size} is not a multiple of the patch size {patch}; "
                            "set img_size or patch_size so that it is")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise UserError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")

    def arch_record(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"img_size": self.img_size, **self.arch_overrides()}
        if self.stop_grad_conv1:
            kwargs["stop_grad_conv1"] = True
        return {"name": self.encoder_arch, "kwargs": kwargs}

    def build_model(self) -> MoCoV3:
        arch = self.arch_record()
        encoder = timm.create_model(arch["name"], num_classes=self.moco_mlp_dim, **arch["kwargs"])
        # SyncBatchNorm only when several processes train together (the original converts unconditionally)
        sync_bn = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return MoCoV3(encoder, self.moco_dim, self.moco_mlp_dim, self.moco_t, self.moco_m, sync_bn=sync_bn)

    def build_datasets(self) -> dict:
        tf = ssl_transform(self.img_size, self.scale, self.mean, self.std, output="uint8")
        train = build_dataset(self.dataset, self.data_root, "train", tf, self.demo_samples)
        return {"train": self.limited(train, "train"), "eval": None}

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        # The original hands every parameter to AdamW with one weight decay (norms, biases and tokens included).
        params = [p for p in model.parameters() if p.requires_grad]
        return build_optimizer([{"params": params, "weight_decay": self.weight_decay, "lr_scale": 1.0}], self)

    def load_initial_weights(self, model: nn.Module, ckpt_path: Optional[str]) -> Optional[str]:
        summary = super().load_initial_weights(model, ckpt_path)  # into model.model, the base encoder
        if summary:
            model.sync_momentum_encoder()
        return summary
