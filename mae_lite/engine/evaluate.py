"""Top-1/top-5 on an eval split; over several processes every image is counted exactly once."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .dist import DistEnv
from .step import autocast_dtype


class ShardSampler(Sampler):
    """Indices rank, rank + world, ...: a disjoint split without the padding DistributedSampler adds."""

    def __init__(self, n: int, env: DistEnv):
        self.indices = list(range(env.rank, n, env.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: Dataset, batch: int, env: DistEnv, workers: int, collate_fn=None) -> DataLoader:
    if hasattr(dataset, "make_loader"):  # e.g. WebDataset shards: every image once over the ranks, sequential reads
        return dataset.make_loader(batch, workers, False, collate_fn, env.device.type == "cuda", env)
    return DataLoader(dataset, batch_size=batch, sampler=ShardSampler(len(dataset), env), num_workers=workers,
                      pin_memory=env.device.type == "cuda", collate_fn=collate_fn)


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, env: DistEnv, amp: bool = False,
             prepare: Optional[Callable] = None, amp_dtype: Optional[str] = None) -> tuple[float, float]:
    """(top-1, top-5) in percent, from correct counts summed over all processes. `prepare(batch, device)` puts a
    batch on the device as the model takes it (the recipe's `eval_batch`: normalising uint8 images...)."""
    was_training = net.training
    net.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=env.device)  # top-1, top-5, images
    dtype = autocast_dtype(env.device, amp_dtype)  # the training run's choice
    for batch in loader:
        if prepare is not None:
            images, target = prepare(batch, env.device)
        else:
            images, target = batch[0].to(env.device, non_blocking=True), batch[1].to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=dtype, enabled=amp):
            logits = net(images)
        top = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top.eq(target[:, None])
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(dim=-1).sum()
        counts[2] += len(target)
    if env.distributed:
        torch.distributed.all_reduce(counts)
    net.train(was_training)
    n = max(counts[2].item(), 1.0)
    return 100.0 * counts[0].item() / n, 100.0 * counts[1].item() / n
