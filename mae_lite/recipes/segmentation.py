"""ADE20K semantic segmentation transfer: Semantic FPN on ViT-Tiny at 512 px (the original's mmseg config
`semantic_fpn_t_160k.py`, fact sheet 4.13), trained by the one loop, evaluated with mmseg's mIoU.

The original trains for 160k iterations and validates every 16k; here one loop "epoch" is `iters_per_epoch`
(16000) iterations over the training images repeated in a shuffled order, and `max_epoch` (10) of them make
the 160k. Initial weights come from `ssl_train --ckpt` (pre-trained, distilled or fine-tuned ViT; ours or the
original's) through the fine-tuning loader; the position embedding is resized to the 32 x 32 grid.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.ade20k import ADE20K, CLASSES, RepeatToLength, SegEvalTransform, SegTrainTransform, collate_segmentation
from ..engine.checkpoint import load_pretrained, load_trained, network_state
from ..engine.dist import DistEnv, loader_workers
from ..engine.log import LOGGER
from ..engine.optim import build_optimizer, layer_decay_scale, param_groups
from ..engine.schedule import WarmupCosine
from ..engine.seg_metrics import SegAreas, per_class_table, seg_metrics
from ..errors import UserError
from ..methods.segment import Segment
from ..models.semantic_fpn import SemanticFPN, slide_inference
from ..models.vit import VIT_ARCHS
from .base import Recipe
from .encoders import backbone_checkpoint, require_blocks


class WarmupPoly(WarmupCosine):
    """mmengine's LinearLR(start_factor, end=W) then PolyLR(power, eta_min=0, begin=W, end=T), per iteration:
    factor start + (1 - start) t / (W - 1) for t < W, then (1 - (t - W) / (T - W - 1))^power (mmengine's
    schedulers span end - begin - 1 steps, so the warm-up reaches lr at W - 1 and the decay reaches 0 at T - 1).
    Times the group's `lr_scale` (layer decay)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int = 0,
                 warmup_factor: float = 1e-6, power: float = 1.0):
        super().__init__(optimizer, lr, total_steps, warmup_steps)
        self.warmup_factor, self.power = warmup_factor, power

    def value(self, t: int, scale: float = 1.0) -> float:
        if t < self.warmup_steps:
            span = self.warmup_steps - 1
            factor = self.warmup_factor + (1.0 - self.warmup_factor) * (t / span if span > 0 else 0.0)
        else:
            span = self.total_steps - self.warmup_steps - 1
            factor = (1.0 - min(t - self.warmup_steps, span) / span) ** self.power if span > 0 else 1.0
        return scale * self.lr * factor


def fold_beit_blocks(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An RPE (BEiT-style) ViT's blocks as plain ViT blocks computing the same function: `q_bias`/`v_bias` become
    `qkv.bias` = (q, 0, v) and LayerScale `gamma_1`/`gamma_2` is multiplied into `attn.proj` / `mlp.fc2`. The
    relative position tables are dropped, as mmseg's `MAE` backbone drops them. Returns (state, dropped keys)."""
    out, dropped = dict(state), []
    blocks = sorted({k.split(".")[1] for k in state if k.startswith("blocks.") and k.endswith("attn.q_bias")}, key=int)
    for i in blocks:
        b = f"blocks.{i}."
        q, v = out.pop(b + "attn.q_bias"), out.pop(b + "attn.v_bias")
        out[b + "attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        for gamma, layer in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
            if b + gamma in out:
                g = out.pop(b + gamma)
                out[b + layer + ".weight"] = out[b + layer + ".weight"] * g[:, None]
                out[b + layer + ".bias"] = out[b + layer + ".bias"] * g
        dropped += [k for k in list(out) if k.startswith(b + "attn.relative_position")]
        for k in dropped:
            out.pop(k, None)
    return out, dropped


class SemanticFPNViT(Recipe):
    name: ClassVar[str] = "semantic_fpn_t_160k"
    aliases: ClassVar[tuple[str, ...]] = ("semantic_fpn_t_160k.py",)
    primary_metric: ClassVar[str] = "mIoU"

    # run: 10 "epochs" of 16k iterations = the original's 160k, validated and saved every 16k
    dataset: str = "ade20k"
    batch_size: int = 16  # 2 per GPU x 8
    max_epoch: int = 10
    iters_per_epoch: int = 16000
    eval_interval: int = 1
    dump_interval: int = 1
    print_interval: int = 50
    # data: 512 crops of images resized to (2048, 512) x 0.5-2.0; eval at (2048, 512), slide windows
    img_size: int = 512  # crop size = the backbone's input size (32 x 32 tokens)
    resize_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    eval_mode: str = "slide"  # slide (crop img_size, stride eval_stride) or whole
    eval_stride: Optional[int] = None  # None: 2/3 of the crop, rounded down (the original's 341 at 512)
    # model
    encoder_arch: str = "vit_tiny_patch16"
    depth: Optional[int] = None  # None: the architecture's (12)
    patch_size: Optional[int] = None
    out_indices: tuple[int, ...] = (3, 5, 7, 11)
    drop_path: float = 0.1
    neck_scale_factor: float = 0.25  # 192 -> 48 channels
    head_channels: int = 128
    dropout: float = 0.1
    num_classes: int = 150
    sync_bn: bool = True  # SyncBN when training over several CUDA processes (NCCL), else BatchNorm
    # optimisation: AdamW 1e-4, wd 0.05, layer decay 0.8, 1500 warm-up iterations from 1e-6 x lr, then poly
    lr: Optional[float] = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.8
    warmup_epochs: int = 0
    warmup_iters: int = 1500
    warmup_factor: float = 1e-6
    poly_power: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.encoder_arch not in VIT_ARCHS:
            raise UserError(f"encoder_arch must be a plain ViT ({', '.join(VIT_ARCHS)}), got {self.encoder_arch!r}")
        depth, patch = self.arch_value("depth"), self.arch_value("patch_size")
        if self.img_size % patch:
            raise UserError(f"img_size {self.img_size} must be a multiple of the patch size {patch}")
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices) \
                or max(self.out_indices) != depth - 1:
            raise UserError(f"out_indices must be 4 block indices in 0..{depth - 1}, the last one {depth - 1} (blocks "
                            f"after it would get no gradient), got {self.out_indices}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise UserError(f"ratio_range must be (low, high) with 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise UserError(f"cat_max_ratio must be in (0, 1] (1: off), got {self.cat_max_ratio}")
        if self.eval_mode not in ("slide", "whole"):
            raise UserError(f"eval_mode must be 'slide' or 'whole', got {self.eval_mode!r}")
        if self.eval_stride is not None and not 0 < self.eval_stride <= self.img_size:
            raise UserError(f"eval_stride must be in 1..img_size ({self.img_size}) or None, got {self.eval_stride}")
        if not 0 < self.layer_decay <= 1:
            raise UserError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.warmup_factor <= 1:
            raise UserError(f"warmup_factor must be in [0, 1], got {self.warmup_factor}")
        for key in ("iters_per_epoch", "num_classes", "head_channels"):
            if getattr(self, key) < 1:
                raise UserError(f"option '{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_iters", "drop_path", "dropout"):
            if getattr(self, key) < 0:
                raise UserError(f"option '{key}' must be >= 0, got {getattr(self, key)}")

    @property
    def stride(self) -> int:
        return self.eval_stride or max(1, self.img_size * 2 // 3)

    def arch_value(self, key: str) -> int:
        return getattr(self, key) or VIT_ARCHS[self.encoder_arch][key]

    # ----- model ----------------------------------------------------------------------------------
    def arch_record(self) -> dict[str, Any]:
        kwargs = {"img_size": self.img_size, "out_indices": list(self.out_indices), "num_classes": self.num_classes,
                  "neck_scale_factor": self.neck_scale_factor, "head_channels": self.head_channels,
                  **self.arch_overrides()}
        return {"name": self.encoder_arch, "kwargs": kwargs, "segmentor": "semantic_fpn"}

    def build_network(self) -> SemanticFPN:
        # global_pool "token" (both our ViT and timm's accept it) gives a `norm`, which mmseg's backbone does not
        # apply (final_norm=False): it becomes an identity, so that every parameter takes part (DDP)
        vit = timm.create_model(self.encoder_arch, img_size=self.img_size, drop_path_rate=self.drop_path,
                                num_classes=0, global_pool="token", **self.arch_overrides())
        vit.norm = nn.Identity()
        return SemanticFPN(vit, self.out_indices, self.neck_scale_factor, self.head_channels, self.num_classes,
                           self.dropout)

    def build_model(self) -> Segment:
        method = Segment(self.build_network())
        dist = torch.distributed
        if self.sync_bn and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
                and dist.get_backend() == "nccl":
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)  # the original's SyncBN (CUDA only)
        return method

    def load_initial_weights(self, model: nn.Module, ckpt_path: Optional[str]) -> Optional[str]:
        """Backbone weights from `--ckpt` as fine-tuning loads them (decoder, mask token, head and final norm
        unused; the position embedding resized to the crop's grid); neck and head start from initialisation.
        An RPE fine-tuned checkpoint (q/v biases, LayerScale) is folded into plain ViT blocks first."""
        vit = model.model.backbone
        ckpt = backbone_checkpoint(ckpt_path, vit, ema=self.weights_ema)
        if ckpt is None:
            return None
        state, dropped = fold_beit_blocks(network_state(ckpt, self.weights_prefix))
        report = load_pretrained(vit, {"model": state}, prefix="", drop=("decoder", "mask_token"))
        require_blocks(report, ckpt_path)
        folded = f"; RPE blocks folded into plain ones, {len(dropped)} relative-position tensors dropped" if dropped else ""
        return f"{ckpt_path}: {report.summary}{folded}"

    # ----- data, optimiser, schedule ----------------------------------------------------------------
    def check_dataset(self) -> None:
        if self.dataset.lower() not in ("ade20k", "ade"):
            raise UserError(f"recipe {self.name} reads ADE20K only; set dataset=ade20k (got {self.dataset!r})")

    def build_datasets(self) -> dict:
        self.check_dataset()
        transform = SegTrainTransform(self.img_size, self.resize_scale, self.ratio_range, self.cat_max_ratio,
                                      self.hflip, self.photometric, self.mean, self.std)
        train = self.limited(ADE20K(self.data_root, "train", transform), "train")
        return {"train": RepeatToLength(train, self.iters_per_epoch * self.batch_size),
                "eval": self.build_eval_dataset()}

    def build_eval_dataset(self) -> torch.utils.data.Dataset:
        self.check_dataset()
        return self.limited(ADE20K(self.data_root, "eval", SegEvalTransform(self.resize_scale, self.mean, self.std)),
                            "eval")

    def collate_fn(self) -> Optional[Callable]:
        return collate_segmentation

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """mmseg's LayerDecayOptimizerConstructor: backbone block i at decay^(depth - i), embeddings at
        decay^(depth + 1), neck and head at 1; no weight decay on 1-D tensors and biases (pos_embed and
        cls_token are decayed, as there)."""
        scale = layer_decay_scale(self.arch_value("depth"), self.layer_decay, prefix="model.backbone.")
        return build_optimizer(param_groups(model, self.weight_decay, lr_scale=scale), self)

    def build_schedule(self, optimizer: torch.optim.Optimizer, iters_per_epoch: int) -> WarmupPoly:
        return WarmupPoly(optimizer, self.scaled_lr, iters_per_epoch * self.max_epoch, self.warmup_iters,
                          self.warmup_factor, self.poly_power)

    # ----- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_areas(self, method: nn.Module, loader, env: DistEnv, amp: bool = False) -> SegAreas:
        """Intersection / prediction / label areas of this process's shard, summed over all processes."""
        net = method.model
        was_training = method.training
        method.eval()
        from ..engine.step import autocast_dtype

        amp_dtype = autocast_dtype(env.device, self.amp_dtype)  # the training run's choice
        areas = SegAreas(self.num_classes, env.device)
        for images, labels in loader:
            for image, label in zip(images, labels):
                image, label = image.to(env.device)[None], label.to(env.device)
                with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp):
                    logits = (slide_inference(net, image, self.img_size, self.stride) if self.eval_mode == "slide"
                              else net.segment(image))
                logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
                areas.add(logits.argmax(1)[0], label)
        method.train(was_training)
        return areas.reduce(env)

    def evaluate(self, method: nn.Module, loader, env: DistEnv, amp: bool = False) -> dict[str, float]:
        """mIoU, mAcc, aAcc (percent) over the whole eval split; the per-class table goes to the log."""
        summary, per_class = seg_metrics(self.eval_areas(method, loader, env, amp).areas)
        if env.is_main:
            LOGGER.info("per-class results:\n%s", "\n".join(per_class_table(per_class, self.class_names())))
        return summary

    def class_names(self) -> list[str]:
        if self.num_classes == len(CLASSES):
            return list(CLASSES)
        return [f"class_{i}" for i in range(self.num_classes)]

    def eval_checkpoint(self, ckpt_path: str, env: DistEnv, amp: bool = False) -> list[str]:
        """`ssl_eval`: load a checkpoint of this recipe; the mIoU line and mmseg's per-class table."""
        from ..engine.evaluate import eval_loader

        method = self.build_model()
        load_trained(method.model, ckpt_path, self.name, "depth, patch_size, out_indices, num_classes",
                     ema=self.weights_ema)
        method.to(env.device)
        loader = eval_loader(self.build_eval_dataset(), max(1, self.batch_size // env.world_size), env,
                             loader_workers(self.num_workers, env), collate_fn=collate_segmentation)
        summary, per_class = seg_metrics(self.eval_areas(method, loader, env, amp).areas)
        return ([f"mIoU: {summary['mIoU']:.2f}, mAcc: {summary['mAcc']:.2f}, aAcc: {summary['aAcc']:.2f}"]
                + per_class_table(per_class, self.class_names()))
