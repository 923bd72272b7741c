"""DeiT-style distillation fine-tuning (`projects/eval_tools/finetuning_distill_exp.py`, fact sheet 4.7).

The MAE-default fine-tuning recipe (`finetuning_mae`, which the original's file inherits) with the
original's distilled ViT (the class token feeds `dist_norm` + `head_dist`, the mean-pooled patch tokens
the main head) and a frozen CNN teacher (timm `regnety_160`, average pooling) whose weights come from
`teacher_ckpt_path` (the original downloads timm's; nothing is downloaded here). Default 300 epochs
(the original Exp's own default). Outputs: `<output_dir>/<pretrain_exp_name>/ft_distill_eval`.

    ssl_train -b 1024 -d 0-7 -e 300 -f finetuning_distill_exp.py --amp --exp-options \
        pretrain_exp_name=mae_lite/mae_tiny_400e teacher_ckpt_path=checkpoints/regnety_160-a5fe301d.pth
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional

import timm
import torch
import torch.nn as nn

from ..engine.checkpoint import load_checkpoint, network_state
from ..engine.log import LOGGER
from ..errors import UserError
from ..methods.classify_distill import DISTILL_TYPES, ClassifyDistill
from ..models.vit_distilled import add_distillation_head
from .finetune import FinetuneMAE

TEACHER_HELP = ("the teacher's ImageNet classifier weights (a flat state dict, or {'model': ...} / {'state_dict': "
                "...}, or .safetensors), e.g. DeiT's regnety_160-a5fe301d.pth or timm's regnety_160 model.safetensors")


class FinetuneDistill(FinetuneMAE):
    name: ClassVar[str] = "finetuning_distill"
    aliases: ClassVar[tuple[str, ...]] = ("finetuning_distill_exp.py", "finetuning_distill_exp")

    max_epoch: int = 300
    save_folder_prefix: str = "ft_distill_"
    teacher_arch: str = "regnety_160"  # any timm classifier taking num_classes and global_pool="avg"
    teacher_ckpt_path: Optional[str] = None  # required unless distill_type=none
    teacher_weights_prefix: str = ""  # flat keys; e.g. "module" for a DDP-saved teacher
    distill_type: str = "hard"  # none | soft | hard
    distill_alpha: float = 0.5
    distill_tau: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.distill_type not in DISTILL_TYPES:
            raise UserError(f"distill_type must be one of {', '.join(DISTILL_TYPES)}, got {self.distill_type!r}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise UserError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_tau <= 0:
            raise UserError(f"distill_tau must be > 0, got {self.distill_tau}")
        if self.distill_type != "none" and not self.global_pool:
            raise UserError("the distillation head needs global_pool=True (the class token is the distillation "
                            "token); set global_pool=True or distill_type=none")
        if self.distill_type != "none" and self.teacher_arch not in timm.list_models():
            raise UserError(f"unknown teacher_arch {self.teacher_arch!r}: use a timm classifier name, e.g. regnety_160")

    def build_network(self) -> nn.Module:
        net = super().build_network()
        return net if self.distill_type == "none" else add_distillation_head(net)

    def build_teacher(self) -> nn.Module:
        teacher = timm.create_model(self.teacher_arch, pretrained=False, num_classes=self.num_classes, global_pool="avg")
        state = read_teacher_state(self.teacher_ckpt_path, self.teacher_weights_prefix)
        own = teacher.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and state[k].shape != own[k].shape]
        if missing or wrong:
            parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (("missing", missing), ("of another shape", wrong)) if v]
            raise UserError(f"teacher checkpoint {self.teacher_ckpt_path} does not fit {self.teacher_arch} with "
                            f"{self.num_classes} classes: {', '.join(parts)}; set teacher_arch (and num_classes, "
                            "teacher_weights_prefix) to what it holds")
        teacher.load_state_dict({k: state[k] for k in own})
        LOGGER.info("teacher %s from %s (%d tensors)", self.teacher_arch, self.teacher_ckpt_path, len(own))
        return teacher

    def build_model(self) -> nn.Module:
        if self.distill_type == "none":
            return super().build_model()  # plain fine-tuning: no teacher, no distillation head
        teacher = self.build_teacher()  # first: a bad teacher file stops the run before anything is built
        plain = super().build_model()  # mixup and criterion as finetuning_mae, the distilled network
        return ClassifyDistill(plain.model, teacher, plain.criterion, plain.mixup, self.distill_type,
                               self.distill_alpha, self.distill_tau)


def read_teacher_state(path: Optional[str], prefix: str) -> dict[str, torch.Tensor]:
    """The teacher's flat state dict from `path`, or a one-line UserError saying what to put there."""
    if not path:
        raise UserError(f"set teacher_ckpt_path= to {TEACHER_HELP} (or distill_type=none)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"teacher checkpoint not found: {file}; put {TEACHER_HELP} there, or set teacher_ckpt_path=")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return network_state({"model": load_file(str(file))}, prefix)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: one line
            raise UserError(f"cannot read teacher checkpoint {file}: {str(e).splitlines()[0][:200]}") from None
    return network_state(load_checkpoint(file), prefix)
