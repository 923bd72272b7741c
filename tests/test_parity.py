"""Our MAE against an independent reference assembled from timm's stock blocks, following the
original's forward step by step: same weights and mask must give the same loss and prediction."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

import mae_lite  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_mae import ReferenceMAE  # noqa: E402

@pytest.mark.parametrize("cfg", [dict(img=32, patch=4, dim=192, depth=3, heads=12, ddim=96, ddepth=1, dheads=3),
                                 dict(img=48, patch=8, dim=64, depth=2, heads=4, ddim=32, ddepth=2, dheads=2)])
def test_mae_matches_reference_built_from_timm_blocks(cfg):
    torch.manual_seed(0)
    ours = timm.create_model("mae_vit_tiny_patch16", img_size=cfg["img"], patch_size=cfg["patch"], embed_dim=cfg["dim"],
                             depth=cfg["depth"], num_heads=cfg["heads"], decoder_embed_dim=cfg["ddim"],
                             decoder_depth=cfg["ddepth"], decoder_num_heads=cfg["dheads"], norm_pix_loss=True)
    for p in ours.parameters():  # non-trivial values everywhere (LayerNorms, biases, mask token)
        p.data.add_(torch.randn_like(p) * 0.05)
    ref = ReferenceMAE(**cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(3, 3, cfg["img"], cfg["img"])
    ids = torch.argsort(torch.rand(3, ours.patch_embed.num_patches), dim=1)
    loss, pred, mask, ids_out = ours(imgs, 0.75, ids)
    rloss, rpred, rmask, _ = ref(imgs, 0.75, ids)
    assert torch.equal(ids_out, ids) and torch.equal(mask, rmask)
    torch.testing.assert_close(pred, rpred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, rloss, rtol=1e-6, atol=1e-6)
    loss.backward()
    rloss.backward()
    g = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g[name].grad, rtol=1e-4, atol=1e-6, msg=name)
