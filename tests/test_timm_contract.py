"""timm's model contract on every registered classification model, at small sizes (img 32, patch 8, depth 2).

Full-size configs are checked on the meta device or through their pretrained cfgs only.
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_data_config

import mae_lite  # noqa: F401  (registers the architectures)
from mae_lite.engine.checkpoint import save_checkpoint
from mae_lite.errors import UserError
from mae_lite.models import MOCOV3_ARCHS, RPE_ARCHS, VIT_ARCHS, capture_attention

NAMES = [*VIT_ARCHS, *RPE_ARCHS, *MOCOV3_ARCHS]
# one per class and construction path; the other names differ only in width/depth/heads (checked on meta)
CLASSES = ["vit_tiny_patch16", "vit_tiny_patch16_rpe", "mocov3_vit_tiny_patch16"]
SMALL = dict(img_size=32, patch_size=8, depth=2)
# (tag, authors' file, num_classes) for every released checkpoint (seed README + fact sheet)
RELEASED = {
    "vit_tiny_patch16.scratch_in1k": ("deit_tiny_300e.pth.tar", 1000),
    "vit_tiny_patch16.mae_lite_in1k": ("mae_tiny_400e.pth.tar", 0),
    "vit_tiny_patch16.mae_lite_ft_in1k": ("mae_tiny_400e_ft_300e.pth.tar", 1000),
    "vit_tiny_patch16_rpe.mae_lite_ft_rpe_in1k": ("mae_tiny_400e_ft_rpe_1000e.pth.tar", 1000),
    "vit_tiny_patch16.mae_lite_distill_in1k": ("mae_tiny_distill_400e.pth.tar", 0),
    "vit_tiny_patch16.mae_lite_distill_ft_in1k": ("mae_tiny_distill_400e_ft_300e.pth.tar", 1000),
    "vit_tiny_patch16.mocov3_ft_in1k": ("mocov3_tiny_400e_ft_300e.pth.tar", 1000),
    "vit_small_patch16.mae_lite_in1k": ("mae_small_400e.pth.tar", 0),
    "vit_base_patch16.mae_in1k": ("mae_base_1600e.pth.tar", 0),
    "mocov3_vit_tiny_patch16.mocov3_in1k": ("mocov3_tiny_400e.pth.tar", 0),
}


def small(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, "num_classes": 5, **kw}).eval()


def test_released_tags_carry_file_size_transform_and_classes():
    assert set(RELEASED) <= set(timm.list_pretrained())
    for tag, (file, classes) in RELEASED.items():
        cfg = timm.get_pretrained_cfg(tag).to_dict()
        assert cfg["file"] == f"checkpoints/{file}" and cfg["num_classes"] == classes and "url" not in cfg
        assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    # the untagged name keeps 1000 classes (the default tag is a classifier)
    for name in NAMES:
        with torch.device("meta"):
            m = timm.create_model(name)
        assert m.num_classes == 1000 and m.pretrained_cfg["num_classes"] == 1000
        assert resolve_data_config(model=m)["input_size"] == (3, 224, 224)
        arch = {**VIT_ARCHS, **RPE_ARCHS, **MOCOV3_ARCHS}[name]
        assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (arch["embed_dim"], arch["depth"], arch["num_heads"])
        assert m.patch_embed.patch_size == (arch["patch_size"],) * 2 and m.feature_info[-1]["reduction"] == arch["patch_size"]


@pytest.mark.parametrize("name", CLASSES)
def test_forward_features_head_and_classifier(name):
    m = small(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 17, m.embed_dim) and m.num_features == m.head_hidden_size == m.embed_dim
        assert m.forward_head(feats, pre_logits=True).shape == (2, m.embed_dim)
        torch.testing.assert_close(m.forward_head(feats), m(x))
        assert m(x).shape == (2, 5)
        m.reset_classifier(3)
        assert m(x).shape == (2, 3) and m.get_classifier().out_features == 3
        m.reset_classifier(0)
        assert m(x).shape == (2, m.embed_dim)


@pytest.mark.parametrize("name", CLASSES)
def test_features_only_and_intermediates_equal_the_blocks(name):
    m = small(name, depth=3)
    x = torch.randn(1, 3, 32, 32)
    outs = []
    hooks = [b.register_forward_hook(lambda mod, i, o: outs.append(o)) for b in m.blocks]
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, output_fmt="NLC")
        for h in hooks:
            h.remove()
        assert len(inter) == 3
        for got, block_out in zip(inter, outs):
            torch.testing.assert_close(got, block_out[:, 1:])  # patch tokens of each block's output
        torch.testing.assert_close(final, m.forward_features(x))
        fm = small(name, depth=3, features_only=True, out_indices=(0, 2))
        fm.load_state_dict(m.state_dict(), strict=False)
        maps = fm(x)
    assert fm.feature_info.channels() == [m.embed_dim] * 2 and fm.feature_info.reduction() == [8, 8]
    assert [tuple(f.shape) for f in maps] == [(1, m.embed_dim, 4, 4)] * 2
    torch.testing.assert_close(maps[1], inter[2].transpose(1, 2).reshape(1, -1, 4, 4))


@pytest.mark.parametrize("name", CLASSES)
def test_grad_checkpointing_gives_equal_outputs_and_gradients(name):
    m = small(name).train()
    x = torch.randn(2, 3, 32, 32)
    plain = m(x)
    plain.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    ckpt = m(x)
    torch.testing.assert_close(ckpt, plain)
    ckpt.square().sum().backward()
    assert grads
    for n, p in m.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", CLASSES)
def test_set_input_size_and_fx(name):
    gm = torch.fx.symbolic_trace(small(name))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), small(name)(x))
    m = small(name)
    if not hasattr(m, "set_input_size"):
        pytest.skip(f"timm {timm.__version__}'s Beit has no set_input_size (timm >= 1.0.31 has)")
    m.set_input_size(img_size=(48, 48))
    with torch.no_grad():
        assert m(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_torchscript_of_the_plain_vit():
    m = small("vit_tiny_patch16")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(m)(x), m(x))


# ----- released-format checkpoints through timm itself --------------------------------------------------------
def _mae_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    mae = timm.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2)
    for p in mae.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return mae.state_dict()


def test_pretrained_encoder_loads_through_pretrained_cfg_overlay(tmp_path):
    sd = _mae_state(1)
    for layout, prefix in (("original", "module.model."), ("ours", "model."), ("flat", "")):
        path = tmp_path / f"{layout}.pth.tar"
        save_checkpoint({"model": {prefix + k: v for k, v in sd.items()}, "start_epoch": 400}, path)
        m = timm.create_model("vit_tiny_patch16.mae_lite_in1k", pretrained=True, **SMALL, global_pool="token",
                              pretrained_cfg_overlay=dict(file=str(path)))
        assert m.num_classes == 0 and "state_dict" not in m.pretrained_cfg
        own = m.state_dict()
        for k in ("cls_token", "pos_embed", "blocks.1.attn.qkv.weight", "norm.weight"):
            assert torch.equal(own[k], sd[k]), (layout, k)  # decoder and mask token dropped, the encoder's norm kept
    avg = timm.create_model("vit_tiny_patch16.mae_lite_in1k", pretrained=True, num_classes=10, **SMALL,
                            pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(avg.state_dict()["blocks.0.mlp.fc2.weight"], sd["blocks.0.mlp.fc2.weight"])
    assert (avg.fc_norm.weight == 1).all() and torch.count_nonzero(avg.head.weight) == 0  # left at init


def test_finetuned_rpe_and_moco_checkpoints_load(tmp_path):
    rpe = small("vit_tiny_patch16_rpe", use_abs_pos_emb=True, num_classes=1000)
    for p in rpe.parameters():
        p.data.normal_()
    save_checkpoint({"model": {"module.model." + k: v for k, v in rpe.state_dict().items()}}, tmp_path / "rpe.pth.tar")
    got = timm.create_model("vit_tiny_patch16_rpe.mae_lite_ft_rpe_in1k", pretrained=True, **SMALL,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "rpe.pth.tar"))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), rpe(x))
    moco = small("mocov3_vit_tiny_patch16", num_classes=0)
    sd = {"module.base_encoder." + k: v + 1 for k, v in moco.state_dict().items() if k != "pos_embed"}
    sd.update({"module.base_encoder.head.0.weight": torch.ones(4, 192), "module.momentum_encoder.cls_token": moco.cls_token})
    save_checkpoint({"model": sd}, tmp_path / "moco.pth.tar")
    got = timm.create_model("mocov3_vit_tiny_patch16.mocov3_in1k", pretrained=True, **SMALL,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "moco.pth.tar")))
    assert torch.equal(got.cls_token, moco.cls_token + 1) and torch.equal(got.pos_embed, moco.pos_embed)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        timm.create_model("vit_tiny_patch16.mae_lite_ft_in1k", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth.tar")))
    assert "nope.pth.tar not found" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.cuda
def test_captured_logits_on_cuda_with_fused_attention_match_the_explicit_path():
    m = small("vit_tiny_patch16").cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with capture_attention(m, [1]) as caught:
        out = m(x)
    assert m.blocks[1].attn.fused_attn and caught[1].requires_grad
    m.blocks[1].attn.fused_attn = False  # timm's explicit softmax(q k^T s) v gives the same network output
    torch.testing.assert_close(m(x), out, rtol=1e-4, atol=1e-4)
    caught[1].square().sum().backward()
    assert m.blocks[1].attn.qkv.weight.grad.abs().sum() > 0  # gradients flow through the captured logits
