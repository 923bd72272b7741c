"""MAE reconstructions as a picture: original | masked input | reconstruction | reconstruction + visible.

Under `norm_pix_loss` the decoder predicts each patch normalised by its own mean and variance, so the
prediction alone has no brightness or contrast. To show it as pixels each predicted patch needs a mean
and standard deviation, and the figure says where they came from:
- `denorm="patch"` (default): each patch's own statistics, taken from the original image. For masked
  patches that is information the model never saw, which the figure's caption states;
- `denorm="visible"`: the mean of the visible patches' statistics of that image, i.e. only what the
  model was given (masked patches then differ in structure, not in brightness).
Under pixel targets the prediction is shown as it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..models.mae import MaskedAutoencoderViT

DENORM = ("patch", "visible")


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0,
                denorm: str = "patch"):
    """Return (masked input, reconstruction, reconstruction with visible patches pasted, mask image), all [N,C,H,W]
    in the input's normalised space. The mask is drawn from `seed`, so the same call gives the same picture."""
    if denorm not in DENORM:
        raise ValueError(f"denorm must be one of {DENORM}, got {denorm!r}")
    was_training = model.training
    model.eval()
    n, L = images.shape[0], model.patch_embed.num_patches
    gen = torch.Generator().manual_seed(seed)
    ids_shuffle = torch.argsort(torch.rand(n, L, generator=gen), dim=1).to(images.device)
    _, pred, mask, _ = model(images, mask_ratio, ids_shuffle)
    model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(images.float())
        mean, std = target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + 1.0e-6).sqrt()
        if denorm == "visible":
            vis = (1 - mask)[..., None]  # [N, L, 1], 1 = visible
            count = vis.sum(dim=1, keepdim=True).clamp(min=1)
            mean = ((mean * vis).sum(dim=1, keepdim=True) / count).expand_as(mean)
            std = ((std * vis).sum(dim=1, keepdim=True) / count).expand_as(std)
        pred = pred * std + mean
    recon = model.unpatchify(pred).to(images.dtype)
    mask_img = model.unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]).to(images.dtype))
    masked = images * (1 - mask_img)
    return masked, recon, masked + recon * mask_img, mask_img


def caption(model: MaskedAutoencoderViT, denorm: str = "patch") -> str:
    """What the reconstruction columns show, printed on the figure."""
    if not model.norm_pix_loss:
        return "pixel targets: the reconstruction is the decoder's raw prediction"
    if denorm == "patch":
        return ("norm_pix_loss: each predicted patch is un-normalised with that patch's mean/std taken from the "
                "original (not known to the model for masked patches)")
    return ("norm_pix_loss: predicted patches are un-normalised with the mean/std of the visible patches only "
            "(what the model saw)")


def grid_columns(model: MaskedAutoencoderViT, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 mask_ratio: float = 0.75, seed: int = 0, denorm: str = "patch") -> list[tuple[str, torch.Tensor]]:
    """The four columns as (title, [N, H, W, C] images in [0, 1]); masked patches are grey in the input.
    `images`: normalised float, or uint8 as the loaders give them (normalised here with mean/std)."""
    if images.dtype == torch.uint8:
        from ..data.decode import to_float_normalised

        images = to_float_normalised(images, mean, std)
    masked, recon, pasted, mask_img = reconstruct(model, images, mask_ratio, seed, denorm)
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)

    def show(x: torch.Tensor) -> torch.Tensor:
        return (x * s + m).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()

    hidden = mask_img.permute(0, 2, 3, 1).float().cpu()
    masked_show = show(masked) * (1 - hidden) + 0.5 * hidden
    return [("original", show(images)), (f"masked {mask_ratio:.0%}", masked_show), ("reconstruction", show(recon)),
            ("reconstruction + visible", show(pasted))]


def save_reconstruction_grid(model: MaskedAutoencoderViT, images: torch.Tensor, path: str | Path,
                             mean: Sequence[float], std: Sequence[float], mask_ratio: float = 0.75,
                             seed: int = 0, denorm: str = "patch") -> Path:
    """Write a PNG grid (one row per image) and return its path."""
    from .plots import pyplot

    plt = pyplot()
    cols = grid_columns(model, images, mean, std, mask_ratio, seed, denorm)
    n = images.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n + 0.6), squeeze=False)
    for r in range(n):
        for c, (title, imgs) in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(imgs[r].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(caption(model, denorm), fontsize=7, wrap=True)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
