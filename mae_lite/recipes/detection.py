"""COCO detection transfer: ViTDet Mask R-CNN with a ViT-Tiny backbone (the original's
`mask_rcnn_vitdet_t_100ep.py`, fact sheet 4.12), trained by the one loop, evaluated with pycocotools.

Initial weights come from `ssl_train --ckpt` (MAE-Lite pre-training, distillation, MoCo-v3 with
`weights_prefix=base_encoder`, fine-tuned; ours or the original's) through the fine-tuning loader.
"""
from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import numpy as np
import torch
import torch.nn as nn

from .._optional import require
from ..data.coco import FEATURE, CocoDetection, LargeScaleJitter, collate_detection
from ..engine.checkpoint import load_pretrained, load_trained
from ..engine.dist import DistEnv, loader_workers
from ..engine.optim import build_optimizer
from ..engine.schedule import WarmupMultiStep
from ..errors import UserError
from ..methods.detect import Detect
from ..models.vit import VIT_ARCHS
from ..models.vitdet import GLOBAL_BLOCKS, SimpleFeaturePyramid, ViTDetBackbone, build_mask_rcnn
from .base import Recipe
from .encoders import backbone_checkpoint, require_blocks

if TYPE_CHECKING:
    from pycocotools.coco import COCO

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)  # timm's LayerNorm2d is a LayerNorm


class MaskRCNNViTDet(Recipe):
    name: ClassVar[str] = "mask_rcnn_vitdet_t_100ep"
    aliases: ClassVar[tuple[str, ...]] = ("mask_rcnn_vitdet_t_100ep.py",)
    primary_metric: ClassVar[str] = "bbox_AP"

    # run and data: COCO 2017, large-scale jitter at 640 px
    dataset: str = "coco"
    img_size: int = 640
    batch_size: int = 64
    max_epoch: int = 100
    print_interval: int = 20
    eval_interval: int = 10
    dump_interval: int = 5
    scale_range: tuple[float, float] = (0.1, 2.0)
    hflip: float = 0.5
    # model: ViTDet backbone, simple feature pyramid, Mask R-CNN heads
    encoder_arch: str = "vit_tiny_patch16"
    depth: Optional[int] = None  # None: the architecture's (12)
    window_size: int = 14
    global_blocks: tuple[int, ...] = GLOBAL_BLOCKS
    use_rel_pos: bool = True
    drop_path: float = 0.0
    act_checkpoint: bool = True  # recompute block activations in the backward pass (saves memory)
    pretrain_img_size: int = 224  # the position embedding's grid in checkpoints (14 x 14)
    num_classes: int = 80
    fpn_dim: int = 256
    box_batch_size_per_image: int = 512
    # optimisation: AdamW 1e-4, wd 0.05 except norms and pos_embed, 250 warm-up iterations, x0.1 at 24/27 and 26/27
    lr: Optional[float] = 1e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 0
    warmup_iters: int = 250
    warmup_factor: float = 0.001
    lr_milestones: tuple[float, ...] = (24 / 27, 26 / 27)  # fractions of all iterations
    lr_gamma: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.encoder_arch not in VIT_ARCHS:
            raise UserError(f"encoder_arch must be a plain ViT ({', '.join(VIT_ARCHS)}), got {self.encoder_arch!r}")
        patch = VIT_ARCHS[self.encoder_arch]["patch_size"]
        if self.img_size % patch:
            raise UserError(f"img_size {self.img_size} must be a multiple of the patch size {patch}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise UserError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if not all(0 < m <= 1 for m in self.lr_milestones):
            raise UserError(f"lr_milestones are fractions of the run in (0, 1], got {self.lr_milestones}")
        for key in ("window_size", "warmup_iters"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise UserError(f"option '{key}' must be >= 0, got {getattr(self, key)}")
        for key in ("fpn_dim", "num_classes", "box_batch_size_per_image", "pretrain_img_size"):
            if getattr(self, key) < 1:
                raise UserError(f"option '{key}' must be >= 1, got {getattr(self, key)}")

    # ----- model ----------------------------------------------------------------------------------
    def arch_record(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"img_size": self.img_size, "window_size": self.window_size,
                                  "global_blocks": list(self.global_blocks), "use_rel_pos": self.use_rel_pos,
                                  "num_classes": self.num_classes, "fpn_dim": self.fpn_dim, **self.arch_overrides()}
        return {"name": self.encoder_arch, "kwargs": kwargs, "detector": "mask_rcnn_vitdet"}

    def build_network(self) -> nn.Module:
        arch = {**VIT_ARCHS[self.encoder_arch], **self.arch_overrides()}
        net = ViTDetBackbone(img_size=self.img_size, drop_path_rate=self.drop_path, window_size=self.window_size,
                             global_blocks=self.global_blocks, use_rel_pos=self.use_rel_pos,
                             pretrain_img_size=self.pretrain_img_size, act_checkpoint=self.act_checkpoint, **arch)
        return build_mask_rcnn(SimpleFeaturePyramid(net, self.fpn_dim), self.num_classes, self.img_size,
                               self.box_batch_size_per_image, self.mean, self.std)

    def build_model(self) -> Detect:
        return Detect(self.build_network())

    def load_initial_weights(self, model: nn.Module, ckpt_path: Optional[str]) -> Optional[str]:
        """Backbone weights from `--ckpt` as fine-tuning loads them (decoder, mask token, head, cls token and
        final norm unused; position embedding resized if its grid differs); relative-position tables stay 0."""
        net = model.model.backbone.net
        ckpt = backbone_checkpoint(ckpt_path, net, ema=self.weights_ema)
        if ckpt is None:
            return None
        report = load_pretrained(net, ckpt, prefix=self.weights_prefix, drop=("decoder", "mask_token", "head"))
        require_blocks(report, ckpt_path)
        return f"{ckpt_path}: {report.summary}"

    # ----- data, optimiser, schedule ----------------------------------------------------------------
    def build_datasets(self) -> dict:
        if self.dataset.lower() != "coco":
            raise UserError(f"recipe {self.name} reads COCO only; set dataset=coco (got {self.dataset!r})")
        train = CocoDetection(self.data_root, "train", LargeScaleJitter(self.img_size, self.scale_range, self.hflip))
        if len(train.cat_ids) > self.num_classes:
            raise UserError(f"the annotations have {len(train.cat_ids)} categories but num_classes={self.num_classes}; "
                            f"set num_classes={len(train.cat_ids)}")
        return {"train": self.limited(train, "train"), "eval": self.build_eval_dataset()}

    def build_eval_dataset(self) -> torch.utils.data.Dataset:
        return self.limited(CocoDetection(self.data_root, "eval"), "eval")

    def collate_fn(self) -> Optional[Callable]:
        return collate_detection

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(detection_param_groups(model, self.weight_decay), self)

    def build_schedule(self, optimizer: torch.optim.Optimizer, iters_per_epoch: int) -> WarmupMultiStep:
        total = iters_per_epoch * self.max_epoch
        return WarmupMultiStep(optimizer, self.scaled_lr, total, [int(f * total) for f in self.lr_milestones],
                               self.lr_gamma, self.warmup_iters, self.warmup_factor)

    # ----- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, method: nn.Module, loader, env: DistEnv, amp: bool = False) -> dict[str, float]:
        """COCO box and mask AP (in percent, as detectron2) of the eval split; every process detects on its
        shard, the detections are gathered to rank 0 only (the others would hold every rank's detections for
        nothing), and rank 0's pycocotools numbers are broadcast, so every rank takes the same best-checkpoint
        decision."""
        data = loader.dataset
        coco_ds = data.dataset if isinstance(data, torch.utils.data.Subset) else data
        was_training = method.training
        method.eval()
        from ..engine.step import autocast_dtype

        amp_dtype = autocast_dtype(env.device, self.amp_dtype)  # the training run's choice
        results: list[dict] = []
        image_ids: list[int] = []
        for images, targets in loader:
            images = [im.to(env.device, non_blocking=True) for im in images]
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp):
                outputs = method(images)
            for out, target in zip(outputs, targets):
                image_ids.append(int(target["image_id"]))
                results += coco_results(out, image_ids[-1], coco_ds.label_to_cat)
        method.train(was_training)
        if env.distributed:
            gathered: Optional[list[Any]] = [None] * env.world_size if env.is_main else None
            torch.distributed.gather_object((results, image_ids), gathered, dst=0)
            if env.is_main:
                results = [r for part, _ in gathered for r in part]
                image_ids = [i for _, part in gathered for i in part]
        shared = [coco_metrics(coco_ds.coco, results, image_ids) if env.is_main else None]
        if env.distributed:
            torch.distributed.broadcast_object_list(shared, src=0)
        return shared[0]

    def eval_checkpoint(self, ckpt_path: str, env: DistEnv, amp: bool = False) -> list[str]:
        """`ssl_eval`: load a detection checkpoint of this recipe and return the COCO AP lines to print."""
        from ..engine.evaluate import eval_loader

        method = self.build_model()
        load_trained(method.model, ckpt_path, self.name, "depth, fpn_dim", ema=self.weights_ema)
        method.to(env.device)
        loader = eval_loader(self.build_eval_dataset(), max(1, self.batch_size // env.world_size), env,
                             loader_workers(self.num_workers, env), collate_fn=collate_detection)
        return format_metrics(self.evaluate(method, loader, env, amp))


def detection_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """detectron2's groups for ViTDet: no weight decay on normalisation layers and `pos_embed`; every
    other parameter, biases and relative-position tables included, is decayed."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
    decay: dict[str, Any] = {"params": [], "param_names": [], "lr_scale": 1.0, "weight_decay": weight_decay}
    no_decay: dict[str, Any] = {"params": [], "param_names": [], "lr_scale": 1.0, "weight_decay": 0.0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = no_decay if id(p) in norm_params or name.endswith("pos_embed") else decay
        group["params"].append(p)
        group["param_names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def coco_results(output: dict[str, torch.Tensor], image_id: int, label_to_cat: dict[int, int]) -> list[dict]:
    """One image's detections as COCO result entries: xywh box, score, category id, RLE of the mask > 0.5."""
    boxes = output["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores, labels = output["scores"].float().cpu().tolist(), output["labels"].cpu().tolist()
    rles = []
    if "masks" in output and len(boxes):
        masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = require("pycocotools.mask", FEATURE).encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    out = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        entry = {"image_id": image_id, "category_id": label_to_cat[label], "bbox": box, "score": score}
        if rles:
            entry["segmentation"] = rles[i]
        out.append(entry)
    return out


def coco_metrics(coco_gt: COCO, results: list[dict], image_ids: list[int]) -> dict[str, float]:
    """pycocotools box and mask AP over `image_ids`, in percent: bbox_AP, bbox_AP50, ..., segm_APl.
    No detections at all gives zeros; a size range without ground truth gives NaN (as detectron2)."""
    metrics: dict[str, float] = {}
    for iou_type in ("bbox", "segm"):
        # copies (loadRes adds fields); for masks without the box, so the mask's own area picks its size range
        dts = [{k: v for k, v in r.items() if iou_type == "bbox" or k != "bbox"}
               for r in results if iou_type == "bbox" or "segmentation" in r]
        if not dts:
            metrics.update({f"{iou_type}_{m}": 0.0 for m in METRICS})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = require("pycocotools.cocoeval", FEATURE).COCOeval(coco_gt, coco_gt.loadRes(dts), iou_type)
            ev.params.imgIds = sorted(set(image_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics.update({f"{iou_type}_{m}": float(100 * s) if s >= 0 else float("nan")
                        for m, s in zip(METRICS, ev.stats[:6])})
    return metrics


def format_metrics(metrics: dict[str, float]) -> list[str]:
    """`bbox: AP 40.4 | AP50 ... | APl ...` and the same for `segm`."""
    return [f"{kind}: " + " | ".join(f"{m} {metrics[f'{kind}_{m}']:.3f}" for m in METRICS) for kind in ("bbox", "segm")]
