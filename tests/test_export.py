"""ssl_export: a checkpoint's ViT as a timm model folder that timm rebuilds without mae-lite's models."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from mae_lite.cli.export import main as ssl_export
from mae_lite.engine.checkpoint import save_checkpoint
from mae_lite.engine.export import export_timm
from mae_lite.errors import UserError
from mae_lite.models import VisionTransformer, VisionTransformerRPE

TINY = ["img_size=32", "patch_size=4", "depth=2"]


def _randomize(net: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_pretrained_mae_checkpoint_exports_a_headless_timm_vit(tmp_path, capsys):
    torch.manual_seed(0)
    mae = timm.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=4, depth=2)
    _randomize(mae, 1)
    save_checkpoint({"model": {f"module.model.{k}": v for k, v in mae.state_dict().items()}}, tmp_path / "mae.pth.tar")
    out = tmp_path / "export"
    assert ssl_export(["--ckpt", str(tmp_path / "mae.pth.tar"), "--out", str(out), "--exp-options", *TINY,
                       "global_pool=False"]) == 0
    printed = capsys.readouterr().out
    assert "local-dir:" in printed and "model.safetensors" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 0
    assert cfg["model_args"]["num_heads"] == 12 and cfg["model_args"]["global_pool"] == "token"
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and cfg["pretrained_cfg"]["interpolation"] == "bicubic"
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(model) is TimmViT and model.num_classes == 0  # timm's own ViT, not ours
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model(x)  # cls token after the MAE encoder's final norm
        ref = mae.forward_encoder(x, 0.0, ids_shuffle=torch.arange(64).expand(2, 64))[0][:, 0]
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    assert "12 heads" in (out / "README.md").read_text()


def test_finetuned_classifier_exports_with_its_head_and_identical_logits(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, depth=2, num_classes=3)
    _randomize(vit, 2)
    save_checkpoint({"model": {f"model.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "ft.pth.tar")
    out = tmp_path / "export"
    assert ssl_export(["--ckpt", str(tmp_path / "ft.pth.tar"), "--out", str(out), "--exp-options", *TINY,
                       "num_classes=3"]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit.eval()(x), rtol=1e-5, atol=1e-5)
    assert model.global_pool == "avg" and json.loads((out / "config.json").read_text())["num_classes"] == 3


def test_head_of_another_size_and_networks_timm_cannot_express_are_refused(tmp_path, capsys):
    vit = VisionTransformer(img_size=32, patch_size=4, depth=2, num_classes=3)
    save_checkpoint({"model": {f"model.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "ft.pth.tar")
    assert ssl_export(["--ckpt", str(tmp_path / "ft.pth.tar"), "--out", str(tmp_path / "x"), "--exp-options",
                       *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "3-class head" in err and "num_classes=3" in err
    rpe = VisionTransformerRPE(img_size=32, patch_size=4, depth=2, num_classes=3)
    with pytest.raises(UserError, match="no timm twin"):
        export_timm(rpe, tmp_path / "rpe", mean=(0.5,) * 3, std=(0.5,) * 3)
