"""D²-MAE: decoupled distillation (fact sheet 4.3): reconstruction from block 8, distillation on block 13."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_lite.cli.analysis_common import load_model
from mae_lite.cli.train import main as ssl_train
from mae_lite.engine.checkpoint import load_checkpoint
from mae_lite.errors import UserError
from mae_lite.methods.distill_d2 import MAEDistillD2
from mae_lite.models.mae_d2 import MaskedAutoencoderViTD2
from mae_lite.recipes import FinetuneMAE, resolve_recipe
from mae_lite.recipes.mae_lite_distill_d2 import MaeLiteDistillD2

SMALL = dict(img_size=32, patch_size=8)  # 16 patches, 4 visible at ratio 0.75
DECODER = ("mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred")


def tiny_teacher(depth: int = 12) -> nn.Module:
    torch.manual_seed(1)
    t = timm.create_model("mae_vit_tiny_patch16", depth=depth, **SMALL)
    for name in DECODER:
        delattr(t, name)
    return t


def student() -> MaskedAutoencoderViTD2:
    torch.manual_seed(0)
    return timm.create_model("mae_vit_tiny_d13_patch16", norm_pix_loss=True, **SMALL)


def logits_by_hand(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = F.layer_norm(x, x.shape[-1:], block.norm1.weight, block.norm1.bias, block.norm1.eps)
    B, N, C = h.shape
    heads = block.attn.num_heads
    q, k, _ = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    return q @ k.transpose(-2, -1) / math.sqrt(C // heads)


def test_keys_and_shapes_are_the_originals():
    m = timm.create_model("mae_vit_tiny_d13_patch16")  # 224 px, 16 px patches
    sd = m.state_dict()
    assert len(m.blocks) == 13 and m.decode_idx == 8 and m.depth == 12 and m.num_heads == 12
    assert sorted(k for k in sd if k.startswith("blocks.12.")) == [
        "blocks.12.attn.qkv.bias", "blocks.12.attn.qkv.weight", "blocks.12.norm1.bias", "blocks.12.norm1.weight"]
    assert sd["blocks.12.attn.qkv.weight"].shape == (576, 192) and sd["blocks.12.norm1.weight"].shape == (192,)
    full = {k[len("blocks.11."):] for k in sd if k.startswith("blocks.11.")}
    assert full == {f"{m_}.{p}" for m_ in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                    for p in ("weight", "bias")}
    assert sd["pos_embed"].shape == (1, 197, 192) and sd["decoder_pos_embed"].shape == (1, 197, 96)
    assert sd["decoder_pred.weight"].shape == (768, 96) and "decoder_blocks.0.attn.qkv.weight" in sd
    assert "decoder_blocks.1.norm1.weight" not in sd and "norm.weight" in sd
    # the 13th block's qkv has MAE's init (xavier-uniform, zero bias)
    bound = math.sqrt(6 / (192 + 576))
    w = m.blocks[12].attn.qkv.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and not m.blocks[12].attn.qkv.bias.any()


def test_reconstruction_is_taken_from_block_8_and_never_reaches_blocks_9_to_13():
    m = student()
    imgs = torch.randn(2, 3, 32, 32)
    seen = {}
    m.blocks[7].register_forward_hook(lambda mod, i, o: seen.__setitem__("out8", o.detach()))
    m.blocks[12].register_forward_pre_hook(lambda mod, args: seen.__setitem__("in13", args[0].detach()))
    m.decoder_embed.register_forward_pre_hook(lambda mod, args: seen.__setitem__("latent", args[0].detach()))
    loss, logits, mask, ids = m.forward_distill(imgs, 0.75)
    torch.testing.assert_close(seen["latent"], m.norm(seen["out8"]))
    assert logits.shape == (2, 12, 5, 5)
    torch.testing.assert_close(logits, logits_by_hand(m.blocks[12], seen["in13"]), rtol=1e-5, atol=1e-5)
    # the reconstruction loss equals MAE's on the latent of block 8, and its gradient stops there
    pred = m.forward_decoder(seen["latent"], torch.argsort(ids, dim=1))
    torch.testing.assert_close(loss, m.forward_loss(imgs, pred, mask))
    loss.backward()
    for i, blk in enumerate(m.blocks):
        grads = [p.grad for p in blk.parameters()]
        if i < 8:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), i
        else:
            assert all(g is None or not g.any() for g in grads), i
    # forward() keeps MaskedAutoencoderViT's contract with the same reconstruction
    torch.testing.assert_close(m(imgs, 0.75, ids)[0], loss.detach())


def test_distillation_is_on_block_13_only_with_adapter11():
    m = MAEDistillD2(student(), tiny_teacher())
    assert list(m.attn_adapter) == ["adapter11"] and m.attn_adapter["adapter11"].weight.shape == (12, 12, 1, 1)
    imgs = torch.randn(2, 3, 32, 32)
    caught = {}  # the tokens entering student block 13 and teacher block 12 (plain pre-hooks)
    m.model.blocks[12].register_forward_pre_hook(lambda mod, args: caught.__setitem__("s_in", args[0].detach()))
    m.teacher.blocks[11].register_forward_pre_hook(lambda mod, args: caught.__setitem__("t_in", args[0].detach()))
    loss, logs = m(imgs)
    W = m.attn_adapter["adapter11"].weight[:, :, 0, 0]
    s13 = logits_by_hand(m.model.blocks[12], caught["s_in"])
    t12 = logits_by_hand(m.teacher.blocks[11], caught["t_in"])
    assert s13.shape == t12.shape == (2, 12, 5, 5)
    attn = ((torch.einsum("oh,bhij->boij", W, s13) - t12) ** 2).mean()
    torch.testing.assert_close(logs["attn"], attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), logs["mae"] + logs["attn"])
    # the distillation term trains blocks 9-13; the teacher and its weights stay out of the method
    m.zero_grad()
    (loss - logs["mae"]).backward()  # the attention term only (logs are detached)
    assert m.model.blocks[12].attn.qkv.weight.grad.abs().sum() > 0 and m.model.blocks[9].mlp.fc2.weight.grad.abs().sum() > 0
    assert not any(k.startswith(("teacher", "tch_model")) for k in m.state_dict())
    assert not any(p is q for p in m.parameters() for q in m.teacher.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())


def test_recipe_values_aliases_and_refusals():
    for spec in ("mae_lite_distill_d2", "mae_lite_distill_d2_exp.py", "mae_lite_distill_d2_exp"):
        assert resolve_recipe(spec) is MaeLiteDistillD2
    r = MaeLiteDistillD2()
    assert (r.encoder_arch, r.distill_attn_idx, r.distill_std_attn_idx, r.teacher_arch) == \
        ("mae_vit_tiny_d13_patch16", (12,), (13,), "mae_vit_base_patch16")
    assert (r.mask_ratio, r.max_epoch, r.batch_size, r.warmup_epochs, r.distill_attn_alpha) == (0.75, 400, 4096, 40, 1.0)
    for options, words in [({"distill_std_attn_idx": "(14,)"}, ["distill_std_attn_idx 14", "9..13"]),
                           ({"distill_std_attn_idx": "(8,)"}, ["distill_std_attn_idx 8"]),
                           ({"distill_std_attn_idx": "(12, 13)"}, ["same length"]),
                           ({"distill_hidden_idx": "(1,)"}, ["distill_hidden_idx", "mae_lite_distill"]),
                           ({"encoder_arch": "mae_vit_tiny_patch16"}, ["not a D²-MAE student"])]:
        with pytest.raises(Exception) as info:
            r.update(options)
        assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    assert r.distill_std_attn_idx == (13,)
    # the student's blocks 9-13 learn only from a teacher: plain MAE and D-MAE refuse it as student and teacher
    for recipe, options in [("mae_lite", {"encoder_arch": "mae_vit_tiny_d13_patch16"}),
                            ("mae_lite_distill", {"encoder_arch": "mae_vit_tiny_d13_patch16"}),
                            ("mae_lite_distill", {"teacher_arch": "mae_vit_tiny_d13_patch16"})]:
        with pytest.raises(UserError, match="D²-MAE student"):
            resolve_recipe(recipe)(**options)


def test_cli_run_and_finetuning_loads_12_blocks_skipping_the_13th(tmp_path):
    teacher = tmp_path / "mae_tiny_teacher.pth"
    torch.save({"model": tiny_teacher().state_dict()}, teacher)  # the official format: flat encoder keys
    opts = [f"{k}={v}" for k, v in dict(dataset="demo", demo_samples=8, num_workers=0, print_interval=1,
                                        vis_images=0, teacher_arch="mae_vit_tiny_patch16", **SMALL).items()]
    assert ssl_train(["-d", "cpu", "-f", "mae_lite_distill_d2", "-b", "8", "-e", "1", "--exp-options", *opts,
                      f"teacher_ckpt_path={teacher}", f"output_dir={tmp_path}", "exp_name=d2"]) == 0
    ckpt = load_checkpoint(tmp_path / "d2" / "last_epoch_ckpt.pth.tar")
    keys = ckpt["model"]
    assert "attn_adapter.adapter11.weight" in keys and "model.blocks.12.attn.qkv.weight" in keys
    assert not any(k.startswith(("teacher", "tch_model")) for k in keys)
    assert not any(k.startswith("model.blocks.12.") and k.split(".")[3] in ("norm2", "mlp") for k in keys)
    log = next((tmp_path / "d2").glob("train_log-*.txt")).read_text()
    assert " | mae " in log and " | attn " in log
    # fine-tuning reads blocks 0-11 and says that block 12 was skipped; the original's released layout as well
    released = {"model": {f"module.{k}": v for k, v in keys.items()}}
    released["model"].update({f"module.tch_model.{k}": v for k, v in tiny_teacher().state_dict().items()})
    torch.save(released, tmp_path / "mae_tiny_distill_d2_400e.pth.tar")
    for path in (tmp_path / "d2" / "last_epoch_ckpt.pth.tar", tmp_path / "mae_tiny_distill_d2_400e.pth.tar"):
        ft = FinetuneMAE(num_classes=3, **SMALL)
        method = ft.build_model()
        summary = ft.load_initial_weights(method, str(path))
        assert "blocks not in this network: blocks.12" in summary and "loaded 148 tensors" in summary, summary
        for i in (0, 11):
            assert torch.equal(method.model.blocks[i].attn.qkv.weight, keys[f"model.blocks.{i}.attn.qkv.weight"])
        net, line = load_model(ft, str(path), torch.device("cpu"))  # the analysis commands' loader
        assert "blocks not in this network: blocks.12" in line and len(net.blocks) == 12
