"""MAE-Lite pre-training with attention distillation from a frozen MAE-Base teacher (D-MAE; fact sheet 4.2).

    ssl_train -b 4096 -d 0-7 -e 400 -f mae_lite_distill_exp.py --amp --exp-options \
        teacher_ckpt_path=checkpoints/mae_base_1600e.pth.tar exp_name=mae_lite/mae_tiny_distill_400e
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional

import timm
import torch.nn as nn

from ..engine.checkpoint import load_checkpoint, load_pretrained, network_state
from ..engine.log import LOGGER
from ..errors import UserError
from ..methods import MAEDistill
from ..models.mae import MAE_ARCHS, MaskedAutoencoderViT
from ..models.mae_d2 import MAE_D2_ARCHS
from .mae_lite import MaeLite

TEACHER_HELP = ("an MAE encoder checkpoint in the official format {'model': flat keys}, e.g. the authors' "
                "mae_base_1600e.pth.tar (DISTILL.md) or facebookresearch/mae's mae_pretrain_vit_base.pth")
DECODER = ("mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred")


class MaeLiteDistill(MaeLite):
    name: ClassVar[str] = "mae_lite_distill"
    aliases: ClassVar[tuple[str, ...]] = ("mae_lite_distill_exp.py", "mae_lite_distill_exp")

    teacher_arch: str = "mae_vit_base_patch16"
    teacher_ckpt_path: Optional[str] = None  # required
    teacher_weights_prefix: str = ""  # official MAE files hold flat keys; ours hold `model.*` (found either way)
    teacher_depth: Optional[int] = None  # None: the architecture's own (small teachers for tests)
    distill_attn_idx: tuple[int, ...] = (12,)  # 1-based layers; the same index in student and teacher
    distill_attn_alpha: float = 1.0
    use_attn_adapter: bool = True  # forced on when the head counts differ
    distill_hidden_idx: tuple[int, ...] = ()  # 0..depth: block i's norm1 output, depth: the final norm
    distill_hidden_alpha: float = 1.0
    use_hidden_adapter: bool = True  # forced on when the widths differ

    def validate(self) -> None:
        super().validate()
        if self.teacher_arch not in MAE_ARCHS:
            raise UserError(f"teacher_arch {self.teacher_arch!r} is not an MAE model; use one of {', '.join(MAE_ARCHS)}")
        if self.teacher_arch in MAE_D2_ARCHS:
            raise UserError(f"teacher_arch {self.teacher_arch!r} is a D²-MAE student, not a teacher; use a plain MAE "
                            "such as mae_vit_base_patch16")
        if self.teacher_depth is not None and self.teacher_depth < 1:
            raise UserError(f"teacher_depth must be >= 1 (or None), got {self.teacher_depth}")
        depth = self.depth or MAE_ARCHS[self.encoder_arch]["depth"]
        t_depth = self.teacher_depth or MAE_ARCHS[self.teacher_arch]["depth"]
        for i in self.distill_attn_idx:
            if not 1 <= i <= min(depth, t_depth):
                raise UserError(f"distill_attn_idx {i} is outside 1..{min(depth, t_depth)} (1-based layers that both "
                                f"the {depth}-block student and the {t_depth}-block teacher have)")
        for i in self.distill_hidden_idx:
            if not 0 <= i <= min(depth, t_depth):
                raise UserError(f"distill_hidden_idx {i} is outside 0..{min(depth, t_depth)}")
        if not self.distill_attn_idx and not self.distill_hidden_idx:
            raise UserError("distill_attn_idx and distill_hidden_idx are both empty: nothing to distil; "
                            "use -f mae_lite for plain MAE pre-training")
        for key in ("distill_attn_alpha", "distill_hidden_alpha"):
            if getattr(self, key) < 0:
                raise UserError(f"option '{key}' must be >= 0, got {getattr(self, key)}")

    def build_teacher(self) -> MaskedAutoencoderViT:
        """The frozen teacher encoder on the student's patch grid, every encoder weight from the checkpoint."""
        kwargs = {"img_size": self.img_size}
        if self.patch_size:
            kwargs["patch_size"] = self.patch_size
        if self.teacher_depth:
            kwargs["depth"] = self.teacher_depth
        teacher = timm.create_model(self.teacher_arch, **kwargs)
        for name in DECODER:
            delattr(teacher, name)
        summary = load_teacher_weights(teacher, self.teacher_ckpt_path, self.teacher_weights_prefix, self.teacher_arch)
        LOGGER.info("teacher %s from %s", self.teacher_arch, summary)
        return teacher

    def build_model(self) -> MAEDistill:
        teacher = self.build_teacher()  # first: a bad teacher file stops the run before anything is built
        student = super().build_model().model
        return MAEDistill(student, teacher, self.mask_ratio, self.distill_attn_idx, self.distill_attn_alpha,
                          self.use_attn_adapter, self.distill_hidden_idx, self.distill_hidden_alpha,
                          self.use_hidden_adapter)


def load_teacher_weights(teacher: nn.Module, path: Optional[str], prefix: str, arch: str) -> str:
    """Load every encoder weight of `teacher` from `path`, or raise a one-line UserError saying what is wrong."""
    if not path:
        raise UserError(f"set teacher_ckpt_path= to {TEACHER_HELP}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"teacher checkpoint not found: {file}; put {TEACHER_HELP} there, or set teacher_ckpt_path=")
    ckpt = load_checkpoint(file)
    own = teacher.state_dict()
    state = network_state(ckpt, prefix)
    if not prefix and not any(k in own for k in state):  # our own checkpoints keep the network under `model.`
        try:
            state, prefix = network_state(ckpt, "model"), "model"
        except UserError:
            pass
    fixed = {k for k, p in teacher.named_parameters() if not p.requires_grad}  # sin-cos tables: rebuilt, not needed
    missing = [k for k in own if k not in state and k not in fixed]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and k not in fixed and state[k].shape != own[k].shape]
    if missing or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (("missing", missing), ("of another shape", wrong)) if v]
        raise UserError(f"teacher checkpoint {file} does not fit {arch} on this patch grid: {', '.join(parts)}; "
                        "set teacher_arch (and teacher_weights_prefix) to what it holds")
    report = load_pretrained(teacher, ckpt, prefix=prefix)
    return f"{file}: {report.summary}"
