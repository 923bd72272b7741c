"""MAE-Lite pre-training, exactly `projects/mae_lite/mae_lite_exp.py` of the original (fact sheet 4.1)."""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import timm

from ..data import build_dataset, pretrain_transform
from ..engine.log import LOGGER
from ..errors import UserError
from ..methods import MAE
from ..models.mae import MAE_ARCHS
from ..models.mae_d2 import MAE_D2_ARCHS
from .base import Recipe


class MaeLite(Recipe):
    name: ClassVar[str] = "mae_lite"
    d2_student: ClassVar[bool] = False  # the recipe trains the D²-MAE student (mae_lite_distill_d2)
    aliases: ClassVar[tuple[str, ...]] = ("mae_lite_exp.py", "mae_lite_exp")
    uint8_batches: ClassVar[bool] = True

    # model
    encoder_arch: str = "mae_vit_tiny_patch16"  # 192 dim, 12 blocks, 12 heads; decoder 96 / 1 / 3
    patch_size: Optional[int] = None  # None: the architecture's own (16)
    depth: Optional[int] = None  # encoder depth, None: the architecture's own (12)
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    # schedule and optimiser: AdamW (0.9, 0.95), wd 0.05, lr 1.5e-4 x batch / 256, 40 warm-up epochs, cosine to 0
    batch_size: int = 4096
    max_epoch: int = 400
    opt_betas: tuple[float, float] = (0.9, 0.95)
    basic_lr_per_img: float = 1.5e-4 / 256
    warmup_epochs: int = 40
    # augmentation: RandomResizedCrop(scale 0.08-1, random bilinear/bicubic) + horizontal flip, nothing else
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "random"
    hflip: float = 0.5
    demo_samples: int = 2048  # images per epoch drawn from the embedded photos (dataset=demo)
    vis_images: int = 4  # reconstructions written as PNG at every checkpoint (0: none)

    def validate(self) -> None:
        super().validate()
        if self.encoder_arch not in MAE_ARCHS:
            raise UserError(f"encoder_arch {self.encoder_arch!r} is not an MAE model; use one of {', '.join(MAE_ARCHS)}")
        if self.encoder_arch in MAE_D2_ARCHS and not self.d2_student:  # its blocks 9-13 learn only from a teacher
            raise UserError(f"encoder_arch {self.encoder_arch!r} is the D²-MAE student: train it with "
                            "-f mae_lite_distill_d2")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.hflip <= 1.0:
            raise UserError(f"hflip is a probability in [0, 1], got {self.hflip}")
        patch = self.patch_size or MAE_ARCHS[self.encoder_arch]["patch_size"]
        if self.img_size % patch:
            raise UserError(f"img_size {self.img_size} is not a multiple of the patch size {patch}; "
                            f"set img_size or patch_size so that it is")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise UserError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if self.interpolation not in ("random", "bilinear", "bicubic", "nearest"):
            raise UserError(f"interpolation must be random, bilinear, bicubic or nearest, got {self.interpolation!r}")

    def train_transform(self):
        """uint8 crops from the workers; with decode_on_device, JPEG bytes + crop parameters (data/gpu_decode.py)."""
        if not self.decode_on_device:
            return pretrain_transform(self.img_size, self.scale, self.ratio, self.interpolation, self.hflip, self.mean,
                                      self.std, output="uint8")
        import torch

        from ..data.gpu_decode import DeviceDecodeCrop

        if not torch.cuda.is_available():
            LOGGER.info("notice: decode_on_device=True without CUDA: JPEGs are decoded in the main process on the CPU "
                        "(the same code as on a GPU, slower than decoding in loader workers)")
        return DeviceDecodeCrop(self.img_size, self.scale, self.ratio, self.interpolation, self.hflip)

    def arch_record(self) -> dict[str, Any]:
        kwargs = {"img_size": self.img_size, "norm_pix_loss": self.norm_pix_loss, **self.arch_overrides()}
        return {"name": self.encoder_arch, "kwargs": kwargs}

    def build_model(self) -> MAE:
        arch = self.arch_record()
        return MAE(timm.create_model(arch["name"], **arch["kwargs"]), self.mask_ratio)

    def build_datasets(self) -> dict:
        train = build_dataset(self.dataset, self.data_root, "train", self.train_transform(), self.demo_samples)
        return {"train": self.limited(train, "train"), "eval": None}


class MaeLiteDemo(MaeLite):
    """The MAE-Lite recipe sized for a CPU: MAE-Tiny (full depth) at 32 px with 4-px patches on the embedded photos."""

    name: ClassVar[str] = "mae_lite_demo"
    aliases: ClassVar[tuple[str, ...]] = ()
    dataset: str = "demo"
    img_size: int = 32
    patch_size: Optional[int] = 4
    batch_size: int = 128
    max_epoch: int = 30
    warmup_epochs: int = 3
    lr: Optional[float] = 1.5e-3
    num_workers: int = 2
    dump_interval: int = 5
    print_interval: int = 4
