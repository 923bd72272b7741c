"""What the analysis tools read out of an encoder: tokens, per-layer representations, pooled features.

Works for the classification ViTs (ours, the RPE ViT) and for an MAE model, whose encoder then runs on
all patches in their natural order (mask ratio 0, identity shuffle), so its tokens line up with the
patch grid.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

from ..models.mae import MaskedAutoencoderViT
from ..models.vit import uses_mean_pool


def run_encoder(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """One forward of the encoder (hooks inside it fire); the tokens [B, 1 + h*w, D] it ends with."""
    if isinstance(model, MaskedAutoencoderViT):
        n, L = images.shape[0], model.patch_embed.num_patches
        in_order = torch.arange(L, device=images.device).expand(n, L)
        return model.forward_encoder(images, 0.0, ids_shuffle=in_order)[0]
    return model.forward_features(images)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last block: `fc_norm` under global pooling, else `norm` (as the original's RepCatcher)."""
    if uses_mean_pool(model) and isinstance(getattr(model, "fc_norm", None), nn.LayerNorm):
        return model.fc_norm
    return model.norm


def num_prefix_tokens(model: nn.Module, tokens: int) -> int:
    """Tokens before the patch tokens (the cls token), from the sequence length and the patch grid."""
    h, w = model.patch_embed.grid_size
    return tokens - h * w


def limited_batches(loader: Iterable, max_images: Optional[int] = None) -> Iterator:
    """A loader's batches ((images, labels, ...) or bare images) until `max_images` images, the last one cut."""
    seen = 0
    for batch in loader:
        parts = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        if max_images is not None:
            parts = [part[: max_images - seen] for part in parts]
        if len(parts[0]) == 0:
            return
        seen += len(parts[0])
        yield parts if isinstance(batch, (list, tuple)) else parts[0]
        if max_images is not None and seen >= max_images:
            return


def image_batches(loader: Iterable, max_images: Optional[int] = None) -> Iterator[torch.Tensor]:
    """The image tensors of a loader's batches ((images, labels) or bare images), cut off at `max_images`."""
    for batch in limited_batches(loader, max_images):
        yield batch[0] if isinstance(batch, list) else batch


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run the block with the models in eval mode, then give each back the mode it had."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@contextmanager
def catch_layers(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the depth + 1 representations the paper compares (fact sheet 4.15), patch tokens only:
    layer i < depth is the output of `blocks[i].norm1` (layer 0: normalised patch + position embedding),
    layer depth is the final norm applied to every token of the last block's output. Yields
    {layer: [B, h*w, D]} filled by each forward inside the block."""
    depth = len(model.blocks)
    caught: dict[int, torch.Tensor] = {}
    norm = final_norm(model)
    mae = isinstance(model, MaskedAutoencoderViT)

    def keep(i: int, out: torch.Tensor) -> None:
        caught[i] = out[:, num_prefix_tokens(model, out.shape[1]):]

    handles = [model.blocks[i].norm1.register_forward_hook(lambda m, inp, out, i=i: keep(i, out)) for i in range(depth)]
    if mae:  # the MAE encoder applies its `norm` itself
        handles.append(norm.register_forward_hook(lambda m, inp, out: keep(depth, out)))
    else:
        handles.append(model.blocks[depth - 1].register_forward_hook(lambda m, inp, out: keep(depth, norm(out))))
    try:
        yield caught
    finally:
        for h in handles:
            h.remove()


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The vector a classification head would see [B, D]: the network's own pooling (`global_pool`: mean of
    patch tokens + `fc_norm`; else the cls token after `norm`); an MAE encoder gives its normalised cls token."""
    if isinstance(model, MaskedAutoencoderViT):
        return run_encoder(model, images)[:, 0]
    return model.forward_head(model.forward_features(images), pre_logits=True)
