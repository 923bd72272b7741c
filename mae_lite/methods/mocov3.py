"""MoCo-v3 pre-training as a method (`projects/mocov3/mocov3.py` of the original, fact sheet 3.4 / 4.9).

Modules and checkpoint keys are the original's: `base_encoder.*` (the ViT, its `head` being the 3-layer
projector), `momentum_encoder.*` (its EMA copy) and `predictor.*`, so fine-tuning loads the encoder with
`weights_prefix=base_encoder`. The loop's `.model` is the base encoder (a property, not a second key).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def cosine_momentum(step: int, total_steps: int, base: float = 0.99) -> float:
    """m = 1 - (1 + cos(pi step / total)) / 2 * (1 - base): `base` at step 0, rising to 1 at the last step."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps))) * (1.0 - base)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum is the sum of the gradients, so backward all-reduces too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batches of all processes, through a differentiable
    all-reduce: SyncBatchNorm for CPU processes (gloo), where torch's has no kernel and DDP refuses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world()[1] > 1):
            return super().forward(x)
        return self._all_reduce_forward(x)

    def _all_reduce_forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        flat = x.float().transpose(0, 1).reshape(c, -1)  # [C, everything else]
        count = torch.tensor([float(flat.shape[1])], device=x.device)
        stats = _AllReduceSum.apply(torch.cat([flat.sum(1), (flat * flat).sum(1), count]))  # sums over processes
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * total / (total - 1).clamp_min(1.0), alpha=f)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def synced_batch_norm() -> type[nn.Module]:
    """The BatchNorm synchronised over the process group: torch's SyncBatchNorm on GPUs (nccl), ours on CPUs."""
    return nn.SyncBatchNorm if dist.get_backend() == "nccl" else AllReduceBatchNorm1d


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True,
              norm: Callable[..., nn.Module] = nn.BatchNorm1d) -> nn.Sequential:
    """MoCo-v3's MLP: (Linear without bias -> BN -> ReLU) x (num_layers - 1), Linear without bias,
    then BN without affine parameters (SimCLR's design) when `last_bn`."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [norm(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(norm(d_out, affine=False))
    return nn.Sequential(*layers)


@torch.no_grad()
def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keys of every process concatenated in rank order, and this process's rank; no collective at world size 1."""
    rank, world = _world()
    if world == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts), rank


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of L2-normalised queries against the keys of all processes, times 2T (MoCo-v3's scale).

    Query i of rank r matches key r N + i of the gathered [world N, D] keys.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    keys, rank = gather_keys(k)
    logits = q @ keys.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


class MoCoV3(nn.Module):
    """`forward((view1, view2), target=None) -> (loss, {"momentum": m})`: symmetric InfoNCE
    ctr(q1, k2) + ctr(q2, k1), queries from base encoder + predictor, keys from the momentum encoder,
    which is first moved towards the base encoder by the EMA rule with the current momentum.
    `set_progress(step, total_steps)` (called by the loop before every forward) sets that momentum.
    """

    def __init__(self, encoder: nn.Module, dim: int = 256, mlp_dim: int = 4096, temperature: float = 0.2,
                 base_momentum: float = 0.99, sync_bn: bool = False):
        super().__init__()
        norm = synced_batch_norm() if sync_bn else nn.BatchNorm1d
        hidden = encoder.head.in_features if isinstance(encoder.head, nn.Linear) else encoder.embed_dim
        encoder.head = build_mlp(3, hidden, mlp_dim, dim, norm=norm)  # the projector replaces the class head
        self.base_encoder = encoder
        self.momentum_encoder = copy.deepcopy(encoder)
        for p in self.momentum_encoder.parameters():
            p.requires_grad = False  # moved only by the EMA rule
        self.predictor = build_mlp(2, dim, mlp_dim, dim, norm=norm)
        self.temperature, self.base_momentum = temperature, base_momentum
        self.momentum = base_momentum

    @property
    def model(self) -> nn.Module:
        """The network the loop and recipes address as `.model`: the base encoder (projector as `head`)."""
        return self.base_encoder

    def set_progress(self, step: int, total_steps: int) -> None:
        self.momentum = cosine_momentum(step, total_steps, self.base_momentum)

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """param_m <- m param_m + (1 - m) param_b, for every parameter (buffers follow their own forwards):
        lerp(param_m, param_b, 1 - m), as one multi-tensor kernel per device and dtype instead of a Python loop."""
        torch._foreach_lerp_(list(self.momentum_encoder.parameters()), list(self.base_encoder.parameters()), 1.0 - m)

    @torch.no_grad()
    def sync_momentum_encoder(self) -> None:
        """Make the momentum encoder an exact copy of the base encoder (after loading initial weights)."""
        self.momentum_encoder.load_state_dict(self.base_encoder.state_dict())

    def forward(self, images: Sequence[torch.Tensor], target: torch.Tensor | None = None):
        if not isinstance(images, (list, tuple)) or len(images) != 2:
            raise ValueError("MoCo-v3 needs two views per image: a (view1, view2) pair of batches "
                             "(build the dataset with mae_lite.data.ssl_transforms.ssl_transform)")
        x1, x2 = images
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        m = self.momentum
        with torch.no_grad():
            if self.training:  # the EMA step belongs to a training step only
                self.update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
        return loss, {"momentum": m}
