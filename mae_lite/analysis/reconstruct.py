"""MAE reconstructions as a picture: original | masked input | reconstruction | reconstruction + visible.

Under `norm_pix_loss` the decoder predicts each patch normalised by its own mean and variance, so the
prediction alone has no colour or brightness. To show it as pixels we put back each patch's mean and
standard deviation taken from the original image, and the figure says so: that information comes
from the target, not from the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..models.mae import MaskedAutoencoderViT


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0):
    """Return (masked input, reconstruction, reconstruction with visible patches pasted, mask image), all [N,C,H,W]
    in the input's normalised space. The mask is drawn from `seed`, so the same call gives the same picture."""
    was_training = model.training
    model.eval()
    n, L = images.shape[0], model.patch_embed.num_patches
    gen = torch.Generator().manual_seed(seed)
    ids_shuffle = torch.argsort(torch.rand(n, L, generator=gen), dim=1).to(images.device)
    _, pred, mask, _ = model(images, mask_ratio, ids_shuffle)
    model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(images)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6).sqrt() + target.mean(dim=-1, keepdim=True)
    recon = model.unpatchify(pred)
    mask_img = model.unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]).to(images.dtype))
    masked = images * (1 - mask_img)
    return masked, recon, masked + recon * mask_img, mask_img


def save_reconstruction_grid(model: MaskedAutoencoderViT, images: torch.Tensor, path: str | Path,
                             mean: Sequence[float], std: Sequence[float], mask_ratio: float = 0.75,
                             seed: int = 0) -> Path:
    """Write a PNG grid (one row per image) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masked, recon, pasted, mask_img = reconstruct(model, images, mask_ratio, seed)
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)

    def show(x: torch.Tensor) -> torch.Tensor:
        return (x * s + m).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    grey = torch.full_like(images, 0.5)
    masked_show = show(masked) * (1 - mask_img.permute(0, 2, 3, 1).cpu()) + show(grey) * mask_img.permute(0, 2, 3, 1).cpu()
    cols = [("original", show(images)), (f"masked {mask_ratio:.0%}", masked_show), ("reconstruction", show(recon)),
            ("reconstruction + visible", show(pasted))]
    n = images.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n + 0.6), squeeze=False)
    for r in range(n):
        for c, (title, imgs) in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(imgs[r].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    note = ("norm_pix_loss: predicted patches are un-normalised with each patch's mean/std taken from the original"
            if model.norm_pix_loss else "pixel targets: reconstruction is the raw prediction")
    fig.suptitle(note, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
