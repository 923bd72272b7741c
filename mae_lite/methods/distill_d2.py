"""D²-MAE (decoupled distillation, IJCV version; fact sheet 4.3): D-MAE whose student reconstructs from an
intermediate layer and is distilled on an extra one.

The student (`MaskedAutoencoderViTD2`) feeds its decoder `norm(output of block decode_idx)` (8) and returns
the logits of its logits-only last block (13). Student layers `student_attn_idx` (1-based, default 13) are
regressed onto teacher layers `attn_idx` (default 12) through the 1x1 adapters `attn_adapter.adapter{t-1}`
(`adapter11`), with D-MAE's loss `L = L_MAE + alpha * sum MSE(adapter(S), T)`. The teacher is held as in
D-MAE: outside the module tree, frozen, in eval mode, not in checkpoints.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..models import capture_attention
from ..models.mae import MaskedAutoencoderViT
from ..models.mae_d2 import MaskedAutoencoderViTD2
from .distill import MAEDistill


class MAEDistillD2(MAEDistill):
    """`forward(images, target=None) -> (loss, {"mae", "attn"})`; network at `.model`."""

    def __init__(self, model: MaskedAutoencoderViTD2, teacher: MaskedAutoencoderViT, mask_ratio: float = 0.75,
                 attn_idx: Sequence[int] = (12,), student_attn_idx: Sequence[int] = (13,), attn_alpha: float = 1.0,
                 use_attn_adapter: bool = True):
        if not isinstance(model, MaskedAutoencoderViTD2):
            raise TypeError(f"the D²-MAE student must be a MaskedAutoencoderViTD2, got {type(model).__name__}")
        if len(student_attn_idx) != len(attn_idx):
            raise ValueError(f"student layers {tuple(student_attn_idx)} and teacher layers {tuple(attn_idx)} "
                             "must pair up one to one")
        for i in student_attn_idx:
            if not model.decode_idx < i <= len(model.blocks):
                raise ValueError(f"student layer {i} is outside {model.decode_idx + 1}..{len(model.blocks)} "
                                 "(the layers after the decoder's input)")
        super().__init__(model, teacher, mask_ratio, attn_idx, attn_alpha, use_attn_adapter)
        self.student_attn_idx = tuple(student_attn_idx)

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None):
        last = len(self.model.blocks)
        hooked = [i - 1 for i in self.student_attn_idx if i != last]  # full blocks: their logits through the hook
        with capture_attention(self.model, hooked) as s_attn:
            loss_mae, logits, _, ids_shuffle = self.model.forward_distill(images, self.mask_ratio)
        s_attn[last - 1] = logits
        with torch.no_grad(), capture_attention(self.teacher, [i - 1 for i in self.attn_idx]) as t_attn:
            self.teacher.forward_encoder(images, self.mask_ratio, ids_shuffle)  # the student's visible patches
        loss_attn = sum(F.mse_loss(self.attn_adapter[f"adapter{t - 1}"](s_attn[s - 1]).float(), t_attn[t - 1].float())
                        for s, t in zip(self.student_attn_idx, self.attn_idx))
        logs = {"mae": loss_mae.detach(), "attn": loss_attn.detach()}
        return loss_mae + self.attn_alpha * loss_attn, logs
