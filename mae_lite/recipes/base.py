"""The recipe base class: hyper-parameters as typed class attributes, validated, overridable by name.

A recipe is a plain class whose annotated attributes are its hyper-parameters (the values of the
original's `*_exp.py`). `--exp-options k=v` converts each value to the declared type and refuses
unknown keys. Builders are plain methods the training loop calls once, after all overrides.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn as nn

from ..engine.optim import build_optimizer, param_groups
from ..engine.schedule import WarmupCosine
from ..errors import UserError
from .options import convert, type_name, unknown_key_error

ARCH_OVERRIDES = ("patch_size", "depth")  # optional fields (None: the architecture's own) a recipe may declare
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Recipe:
    name: ClassVar[str] = "base"
    aliases: ClassVar[tuple[str, ...]] = ()
    primary_metric: ClassVar[str] = "top1"  # the key of evaluate()'s result that picks the best checkpoint
    optimizers: ClassVar[tuple[str, ...]] = ("adamw", "sgd")  # accepted values of `opt` (build_optimizer knows them)
    uint8_batches: ClassVar[bool] = False  # loaders give uint8 images that device_batch normalises (data/device_batch.py)

    # run and output
    exp_name: str = ""  # empty: the recipe's name
    output_dir: str = "./outputs"
    seed: Optional[int] = 0
    batch_size: int = 256  # total over all processes (ssl_train -b)
    max_epoch: int = 100  # ssl_train -e
    print_interval: int = 10
    dump_interval: int = 10  # epochs between checkpoints (the last epoch is always saved)
    eval_interval: int = 10
    enable_tensorboard: bool = True
    # data
    data_root: str = "./data"
    dataset: str = "ImageNet"
    img_size: int = 224
    num_workers: int = 10  # per process, capped by the CPU cores available to it
    train_limit: Optional[int] = None  # keep only the first N training images (small-scale runs)
    eval_limit: Optional[int] = None  # keep only the first N eval images
    max_bad_images: Optional[int] = None  # undecodable training images skipped before the run stops (None: 0.1 %, >= 10)
    decode_on_device: bool = False  # pre-training: workers only read JPEG bytes, device_batch decodes (nvJPEG on CUDA)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # optimisation
    opt: str = "adamw"
    opt_betas: tuple[float, float] = (0.9, 0.999)
    opt_eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.05
    lr: Optional[float] = None  # None: basic_lr_per_img x batch_size
    basic_lr_per_img: float = 1e-3 / 256
    warmup_epochs: int = 5
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    # checkpoints: every dump_interval epochs and at the end; also every N minutes mid-epoch (None: off).
    # SIGTERM/SIGUSR1/Ctrl-C always stop after the current step with a checkpoint that --resume continues.
    ckpt_interval_minutes: Optional[float] = None
    # training loop (docs/training.md)
    accum_iter: int = 1  # micro-batches per optimizer step; -b stays the effective batch
    model_ema: bool = False  # keep timm's ModelEmaV3 of the weights, evaluated and saved as `model_ema`
    model_ema_decay: float = 0.9998
    amp_dtype: Optional[str] = None  # with --amp: "bf16" or "fp16"; None: bf16 where the device has it
    compile: bool = False  # torch.compile the method's network
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on CUDA too)
    # initial weights (ssl_train --ckpt)
    weights_prefix: str = "model"
    weights_ema: bool = False  # --ema: take the checkpoint's EMA weights (`model_ema`) instead of `model`

    def __init__(self, **options: Any):
        for key, tp in self.fields().items():  # instance copies, so class defaults are never mutated
            setattr(self, key, convert(key, getattr(type(self), key), tp))
        self.update(options)

    # ----- fields and overrides -----------------------------------------------------------------
    @classmethod
    def fields(cls) -> dict[str, Any]:
        hints: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if klass is object:
                continue
            for key, tp in typing.get_type_hints(klass).items():
                if typing.get_origin(tp) is not ClassVar and not key.startswith("_"):
                    hints[key] = tp
        return hints

    def update(self, options: dict[str, Any]) -> list[str]:
        """Apply overrides (strings from the command line, or Python values); return what changed."""
        fields = self.fields()
        converted = {}
        for key, value in options.items():
            if key not in fields:
                raise unknown_key_error(key, list(fields), self.name)
            converted[key] = convert(key, value, fields[key])
        before = {key: getattr(self, key) for key in converted}
        for key, value in converted.items():
            setattr(self, key, value)
        try:
            self.validate()
        except UserError:
            for key, value in before.items():  # a refused update changes nothing
                setattr(self, key, value)
            raise
        return [f"{k}: {before[k]!r} -> {v!r}" for k, v in converted.items() if before[k] != v]

    def validate(self) -> None:
        """Refuse values that cannot work, with the fix in the message. Subclasses extend this."""
        positive = ["batch_size", "max_epoch", "img_size", "print_interval", "dump_interval", "eval_interval"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"option '{key}' must be positive, got {getattr(self, key)}")
        for key in ["train_limit", "eval_limit"]:
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"option '{key}' must be >= 1 (or None for all), got {getattr(self, key)}")
        for key in ARCH_OVERRIDES:
            value = getattr(self, key, None)
            if value is not None and value < 1:
                raise UserError(f"option '{key}' must be >= 1 (or None for the architecture's own), got {value}")
        if self.ckpt_interval_minutes is not None and self.ckpt_interval_minutes <= 0:
            raise UserError(f"option 'ckpt_interval_minutes' must be > 0 (or None for off), got {self.ckpt_interval_minutes}")
        for key in ["num_workers", "warmup_epochs", "weight_decay", "warmup_lr", "min_lr", "lr", "clip_grad",
                    "max_bad_images"]:
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise UserError(f"option '{key}' must be >= 0, got {getattr(self, key)}")
        if self.clip_mode not in ("norm", "value"):
            raise UserError(f"option 'clip_mode' must be 'norm' or 'value', got {self.clip_mode!r}")
        if self.accum_iter < 1:
            raise UserError(f"option 'accum_iter' must be >= 1, got {self.accum_iter}")
        if not 0.0 < self.model_ema_decay < 1.0:
            raise UserError(f"option 'model_ema_decay' must be between 0 and 1 (e.g. 0.9998), got {self.model_ema_decay}")
        if self.amp_dtype not in (None, "bf16", "fp16"):
            raise UserError(f"option 'amp_dtype' must be 'bf16', 'fp16' or None (the device's best), got {self.amp_dtype!r}")
        if self.opt.lower() not in self.optimizers:
            raise UserError(f"option 'opt' must be {' or '.join(repr(o) for o in self.optimizers)}, got {self.opt!r}")

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.fields()}

    def config_table(self) -> str:
        rows = [(k, type_name(t), repr(getattr(self, k))) for k, t in self.fields().items()]
        w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        lines = [f"recipe {self.name} ({type(self).__module__}.{type(self).__qualname__})"]
        lines += [f"  {k:<{w0}}  {t:<{w1}}  {v}" for k, t, v in rows]
        return "\n".join(lines)

    # ----- derived values -----------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        return self.exp_name or self.name

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def scaled_lr(self) -> float:
        """The peak learning rate: `lr` when given, else the linear scaling rule on the total batch."""
        return self.lr if self.lr is not None else self.basic_lr_per_img * self.batch_size

    # ----- builders (called once by the loop, after every override) ------------------------------
    def build_model(self) -> nn.Module:
        """The method module: `forward(images, target) -> (loss, logs)`, network at attribute `.model`."""
        raise NotImplementedError

    def build_datasets(self) -> dict[str, Optional[torch.utils.data.Dataset]]:
        """{"train": dataset, "eval": dataset or None}."""
        raise NotImplementedError

    def limited(self, dataset: torch.utils.data.Dataset, split: str) -> torch.utils.data.Dataset:
        """The first `train_limit` / `eval_limit` items of a split, or all of them."""
        n = self.train_limit if split == "train" else self.eval_limit
        if split == "train":
            self._n_train = len(dataset) if n is None else min(n, len(dataset))  # for the max_bad_images default
        if n is None or n >= len(dataset):
            return dataset
        if hasattr(dataset, "head"):  # shards: the first n in index order, still read sequentially
            return dataset.head(n)
        return torch.utils.data.Subset(dataset, range(n))

    def collate_fn(self) -> Optional[Callable]:
        """How the loaders batch items: torch's default (stacked tensors, or tuples of them), with undecodable images
        replaced and listed (data/bad_images.py) and, with decode_on_device, the encoded JPEGs packed into one byte
        tensor per batch (data/gpu_decode.py EncodedBatch: a few shared-memory blocks per batch, not one per image)."""
        from ..data.bad_images import collate

        if self.decode_on_device:
            from functools import partial

            from ..data.gpu_decode import collate_encoded

            return partial(collate, inner=collate_encoded)
        return collate

    def device_batch(self, batch: Any, device: torch.device, train: bool = True) -> tuple[Any, Any]:
        """The loader's batch on `device` as the method takes it, `(images, target)`. The place for work that is
        cheaper on the device than in loader workers (uint8 -> float and normalisation, GPU JPEG decoding, dropping
        skipped images). Called once per step by the loop (and by evaluation), so it must not synchronise with the
        host: no `.item()`, no `bool(tensor)`, no `.cpu()`. `train=False` (evaluation): a bad image is an error."""
        from ..data.device_batch import prepare

        return prepare(batch, device, self.bad_images, train, self.mean, self.std, normalize=self.uint8_batches)

    def eval_batch(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        return self.device_batch(batch, device, train=False)

    @property
    def bad_images(self):
        """This run's BadImageCounter (data/bad_images.py), made on first use."""
        if getattr(self, "_bad_images", None) is None:
            from ..data.bad_images import BadImageCounter, default_limit

            limit = self.max_bad_images if self.max_bad_images is not None else default_limit(getattr(self, "_n_train", 0))
            self._bad_images = BadImageCounter(limit)
        return self._bad_images

    def data_report(self, env) -> dict[str, Any]:
        """Called by the loop at the end of every training epoch, on every rank (it may run collectives): counts
        about the data to log and to keep in the checkpoint under `data` (e.g. skipped undecodable images).
        May raise UserError to stop the run (too many bad images). Default: the undecodable images skipped, over all
        ranks (this epoch's, the run's, the first files)."""
        return self.bad_images.report(env)

    def restore_data_report(self, report: dict[str, Any]) -> None:
        """--resume: the `data` report of the checkpoint (what data_report returned last), so run-wide counts
        (skipped bad images and their limit) continue."""
        if report:
            self.bad_images.restore(report)

    def evaluate(self, method: nn.Module, loader, env, amp: bool = False) -> dict[str, float]:
        """Metrics on the eval split, run every `eval_interval` epochs; must contain `primary_metric`.
        Default: top-1/top-5 of the method's network `.model` on a classification split."""
        from ..engine.evaluate import evaluate

        top1, top5 = evaluate(method.model, loader, env, amp, prepare=self.eval_batch, amp_dtype=self.amp_dtype)
        return {"top1": top1, "top5": top5}

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(param_groups(model, self.weight_decay), self)

    def build_schedule(self, optimizer: torch.optim.Optimizer, iters_per_epoch: int) -> WarmupCosine:
        """Warm-up + cosine per iteration; with layer decay the min_lr floor is scaled per group, as the original."""
        return WarmupCosine(optimizer, self.scaled_lr, total_steps=iters_per_epoch * self.max_epoch,
                            warmup_steps=iters_per_epoch * self.warmup_epochs, warmup_lr=self.warmup_lr,
                            min_lr=self.min_lr)

    def arch_record(self) -> dict[str, Any]:
        """Architecture name and arguments stored in checkpoints, so a mismatched load can be refused."""
        return {}

    def arch_overrides(self) -> dict[str, int]:
        """The architecture arguments this recipe overrides (`patch_size`, `depth` where set)."""
        return {key: getattr(self, key) for key in ARCH_OVERRIDES if getattr(self, key, None)}

    def load_initial_weights(self, model: nn.Module, ckpt_path: Optional[str]) -> Optional[str]:
        """Initialise from `ssl_train --ckpt` at the start of a run (never on --resume); return "<path>: <summary>"."""
        if not ckpt_path:
            return None
        from ..engine.checkpoint import load_pretrained

        report = load_pretrained(model.model, ckpt_path, prefix=self.weights_prefix, ema=self.weights_ema)
        return f"{ckpt_path}: {report.summary}"
