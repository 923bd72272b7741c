"""D-MAE: MAE pre-training plus distillation of a frozen MAE teacher's attention (and optionally hidden states).

Each step the teacher encodes the same images with the student's `ids_shuffle` (the same visible patches)
under `no_grad`. For every chosen layer (1-based, as the original's `distill_attn_idx`) the student's scaled
pre-softmax attention logits `[B, heads, 1 + visible, 1 + visible]` go through a 1x1 convolution over the
head dimension (`attn_adapter.adapter{idx-1}`) and are regressed onto the teacher's with a mean-reduced MSE:

    L = L_MAE + distill_attn_alpha * sum_l MSE(adapter_l(S_l), T_l) [+ distill_hidden_alpha * sum_l MSE(...)]

The teacher is held outside the module tree: it is moved with the method (`.to`, `.half`) but is not part
of `state_dict()` (checkpoints hold the student and the adapters only, not ~330 MB of MAE-Base), not in
`parameters()` (so no optimizer or DDP sees it), and stays in eval mode whatever `train()` is called with.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.mae import MaskedAutoencoderViT
from ..models.vit import capture_attention, capture_representations
from .mae import MAE


class MAEDistill(MAE):
    """`forward(images, target=None) -> (loss, {"mae", "attn"[, "hidden"]})`; network at `.model`."""

    def __init__(self, model: MaskedAutoencoderViT, teacher: MaskedAutoencoderViT, mask_ratio: float = 0.75,
                 attn_idx: Sequence[int] = (12,), attn_alpha: float = 1.0, use_attn_adapter: bool = True,
                 hidden_idx: Sequence[int] = (), hidden_alpha: float = 1.0, use_hidden_adapter: bool = True):
        super().__init__(model, mask_ratio)
        self.attn_idx, self.attn_alpha = tuple(attn_idx), attn_alpha
        self.hidden_idx, self.hidden_alpha = tuple(hidden_idx), hidden_alpha
        for i in self.attn_idx:
            for net, who in ((model, "student"), (teacher, "teacher")):
                if not 1 <= i <= len(net.blocks):
                    raise ValueError(f"distill_attn_idx {i} is outside the {who}'s layers 1..{len(net.blocks)}")
        # Adapters as the original: forced on when the shapes differ, otherwise identity if turned off.
        s_heads, t_heads = model.num_heads, teacher.num_heads
        self.attn_adapter = nn.ModuleDict({
            f"adapter{i - 1}": (nn.Conv2d(s_heads, t_heads, 1, bias=False)
                                if use_attn_adapter or s_heads != t_heads else nn.Identity())
            for i in self.attn_idx})
        s_dim, t_dim = model.embed_dim, teacher.embed_dim
        self.hidden_adapter = nn.ModuleDict({
            f"adapter{i}": nn.Linear(s_dim, t_dim, bias=False) if use_hidden_adapter or s_dim != t_dim else nn.Identity()
            for i in self.hidden_idx})
        teacher.requires_grad_(False)
        teacher.eval()
        self.__dict__["teacher"] = teacher  # not a child module: see the module docstring

    def train(self, mode: bool = True) -> "MAEDistill":
        super().train(mode)
        self.teacher.eval()  # dropout/drop-path never active in the teacher
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None):
        attn_layers = [i - 1 for i in self.attn_idx]
        with capture_attention(self.model, attn_layers) as s_attn, \
                capture_representations(self.model, self.hidden_idx) as s_hid:
            loss_mae, _, _, ids_shuffle = self.model(images, self.mask_ratio)
        with torch.no_grad(), capture_attention(self.teacher, attn_layers) as t_attn, \
                capture_representations(self.teacher, self.hidden_idx) as t_hid:
            self.teacher.forward_encoder(images, self.mask_ratio, ids_shuffle)  # the student's visible patches
        loss, logs = loss_mae, {"mae": loss_mae.detach()}
        if self.attn_idx:
            loss_attn = sum(F.mse_loss(self.attn_adapter[f"adapter{i - 1}"](s_attn[i - 1]).float(),
                                       t_attn[i - 1].float()) for i in self.attn_idx)
            loss = loss + self.attn_alpha * loss_attn
            logs["attn"] = loss_attn.detach()
        if self.hidden_idx:
            loss_hidden = sum(F.mse_loss(self.hidden_adapter[f"adapter{i}"](s_hid[i]).float(), t_hid[i].float())
                              for i in self.hidden_idx)
            loss = loss + self.hidden_alpha * loss_hidden
            logs["hidden"] = loss_hidden.detach()
        return loss, logs
