"""D²-MAE: decoupled distillation (IJCV version, fact sheet 4.3); everything else as D-MAE (4.2).

    ssl_train -b 4096 -d 0-7 -e 400 -f mae_lite_distill_d2_exp.py --amp --exp-options \
        teacher_ckpt_path=checkpoints/mae_base_1600e.pth.tar exp_name=mae_lite/mae_tiny_distill_d2_400e
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

from ..errors import UserError
from ..methods.distill_d2 import MAEDistillD2
from ..models.mae import MAE_ARCHS
from ..models.mae_d2 import MAE_D2_ARCHS
from .mae_lite import MaeLite
from .mae_lite_distill import MaeLiteDistill


class MaeLiteDistillD2(MaeLiteDistill):
    name: ClassVar[str] = "mae_lite_distill_d2"
    aliases: ClassVar[tuple[str, ...]] = ("mae_lite_distill_d2_exp.py", "mae_lite_distill_d2_exp")
    d2_student: ClassVar[bool] = True

    encoder_arch: str = "mae_vit_tiny_d13_patch16"  # 12 full blocks + the logits-only 13th
    decode_idx: Optional[int] = None  # None: the architecture's (8): the decoder reads norm(block 8's output)
    distill_attn_idx: tuple[int, ...] = (12,)  # teacher layers (1-based)
    distill_std_attn_idx: tuple[int, ...] = (13,)  # the student layers paired with them

    def validate(self) -> None:
        super().validate()
        if self.encoder_arch not in MAE_D2_ARCHS:
            raise UserError(f"encoder_arch {self.encoder_arch!r} is not a D²-MAE student; use one of "
                            f"{', '.join(MAE_D2_ARCHS)}, or -f mae_lite_distill for D-MAE")
        if self.distill_hidden_idx:
            raise UserError("distill_hidden_idx is not supported by mae_lite_distill_d2 (attention only); "
                            "use -f mae_lite_distill for hidden-state distillation")
        depth = self.depth or MAE_ARCHS[self.encoder_arch]["depth"]
        decode = self.decode_idx or MAE_D2_ARCHS[self.encoder_arch]["decode_idx"]
        if not 1 <= decode <= depth:
            raise UserError(f"decode_idx {decode} is outside 1..{depth} (the student's full blocks)")
        if len(self.distill_std_attn_idx) != len(self.distill_attn_idx):
            raise UserError(f"distill_std_attn_idx {self.distill_std_attn_idx} and distill_attn_idx "
                            f"{self.distill_attn_idx} must have the same length (student and teacher layers pair up)")
        for i in self.distill_std_attn_idx:
            if not decode < i <= depth + 1:
                raise UserError(f"distill_std_attn_idx {i} is outside {decode + 1}..{depth + 1} (the student layers "
                                f"after the decoder's input block {decode}; {depth + 1} is the logits-only block)")

    def arch_record(self) -> dict[str, Any]:
        arch = super().arch_record()
        if self.decode_idx:
            arch["kwargs"]["decode_idx"] = self.decode_idx
        return arch

    def build_model(self) -> MAEDistillD2:
        teacher = self.build_teacher()  # first: a bad teacher file stops the run before anything is built
        student = MaeLite.build_model(self).model
        return MAEDistillD2(student, teacher, self.mask_ratio, self.distill_attn_idx, self.distill_std_attn_idx,
                            self.distill_attn_alpha, self.use_attn_adapter)
