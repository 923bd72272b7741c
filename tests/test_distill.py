"""D-MAE: attention (and hidden-state) distillation from a frozen MAE teacher (fact sheet 4.2)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_lite.cli.train import main as ssl_train
from mae_lite.engine.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from mae_lite.methods import MAEDistill
from mae_lite.models.mae import MaskedAutoencoderViT
from mae_lite.recipes import FinetuneMAE, resolve_recipe
from mae_lite.recipes.mae_lite_distill import MaeLiteDistill
from _proc import run_process

# student: 16 px images, 4 px patches (16 patches, 4 visible), width 24, 6 heads; teacher: width 32, 4 heads
STUDENT = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=6, decoder_embed_dim=16, decoder_depth=1,
               decoder_num_heads=2, norm_pix_loss=True)
TEACHER = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
               decoder_num_heads=2)


def tiny_pair(**method_kwargs) -> MAEDistill:
    torch.manual_seed(0)
    student, teacher = MaskedAutoencoderViT(**STUDENT), MaskedAutoencoderViT(**TEACHER)
    kwargs = dict(mask_ratio=0.75, attn_idx=(2,))
    kwargs.update(method_kwargs)
    return MAEDistill(student, teacher, **kwargs)


def block_input(model: nn.Module, layer: int, run) -> torch.Tensor:
    """The tokens entering `model.blocks[layer]`, caught with a plain pre-hook (independent of our capture helpers)."""
    seen = {}
    handle = model.blocks[layer].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    return seen["x"]


def logits_by_hand(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """q k^T * head_dim^-0.5 for one block, from its weights."""
    h = F.layer_norm(x, x.shape[-1:], block.norm1.weight, block.norm1.bias, block.norm1.eps)
    B, N, C = h.shape
    heads = block.attn.num_heads
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, _ = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    return q @ k.transpose(-2, -1) / math.sqrt(C // heads)


def spy(method: MAEDistill):
    """Record the student's and the teacher's logits and the ids_shuffle each side used in one forward."""
    rec = {}
    s_fwd, t_enc = method.model.forward, method.teacher.forward_encoder

    def student_forward(imgs, ratio, ids_shuffle=None):
        out = s_fwd(imgs, ratio, ids_shuffle)
        rec["student_ids"] = out[3]
        return out

    def teacher_encoder(imgs, ratio, ids_shuffle=None, patches=None):
        rec["teacher_ids"] = ids_shuffle
        return t_enc(imgs, ratio, ids_shuffle, patches)

    method.model.forward, method.teacher.forward_encoder = student_forward, teacher_encoder
    return rec


def on_logits(attn: nn.Module, fn) -> None:
    """Call fn(q k^T * scale) on every forward, from the q and k that timm's attention puts through q_norm/k_norm."""
    q = {}
    attn.q_norm.register_forward_hook(lambda mod, i, o: q.__setitem__(0, o))
    attn.k_norm.register_forward_hook(lambda mod, i, o: fn(q[0] @ o.transpose(-2, -1) * attn.scale))


def test_distilled_logits_are_q_k_transposed_scaled_and_teacher_sees_the_student_patches():
    m = tiny_pair()
    imgs = torch.randn(3, 3, 16, 16)
    caught = {}
    for net, key in ((m.model, "s"), (m.teacher, "t")):
        on_logits(net.blocks[1].attn, lambda o, key=key: caught.__setitem__(key, o.detach()))
    rec = spy(m)
    x_s = block_input(m.model, 1, lambda: m(imgs))
    ids = rec["student_ids"]
    assert torch.equal(rec["teacher_ids"], ids)  # the teacher got the student's shuffle
    # 16 patches at ratio 0.75 -> 4 visible + cls
    assert caught["s"].shape == (3, 6, 5, 5) and caught["t"].shape == (3, 4, 5, 5)
    torch.testing.assert_close(caught["s"], logits_by_hand(m.model.blocks[1], x_s), rtol=1e-5, atol=1e-5)
    # the teacher's tokens are exactly its encoding of the student's visible patches
    x_t = block_input(m.teacher, 1, lambda: m.teacher.forward_encoder(imgs, 0.75, ids))
    torch.testing.assert_close(caught["t"], logits_by_hand(m.teacher.blocks[1], x_t), rtol=1e-5, atol=1e-5)
    keep = ids[:, :4]
    patches = m.teacher.patchify(imgs)
    w = m.teacher.patch_embed.proj.weight
    first = torch.gather(patches, 1, keep[..., None].expand(-1, -1, patches.shape[-1])) @ \
        w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + m.teacher.patch_embed.proj.bias
    first = first + torch.gather(m.teacher.pos_embed[:, 1:].expand(3, -1, -1), 1, keep[..., None].expand(-1, -1, 32))
    x0 = block_input(m.teacher, 0, lambda: m.teacher.forward_encoder(imgs, 0.75, ids))
    torch.testing.assert_close(x0[:, 1:], first, rtol=1e-5, atol=1e-5)


def test_adapter_shapes_names_and_default_init():
    m = tiny_pair(attn_idx=(1, 2), hidden_idx=(0, 2))
    assert sorted(m.attn_adapter) == ["adapter0", "adapter1"]  # adapter{idx-1}: the original's adapter11 for idx 12
    a = m.attn_adapter["adapter1"]
    assert isinstance(a, nn.Conv2d) and a.weight.shape == (4, 6, 1, 1) and a.bias is None
    bound = 1 / math.sqrt(6)  # PyTorch's default (kaiming-uniform, a=sqrt(5)) bound for fan_in 6, as the original
    assert a.weight.abs().max() <= bound and a.weight.abs().max() > bound / 2
    h = m.hidden_adapter["adapter2"]
    assert isinstance(h, nn.Linear) and h.weight.shape == (32, 24) and h.bias is None
    keys = set(m.state_dict())
    assert {"attn_adapter.adapter0.weight", "attn_adapter.adapter1.weight", "hidden_adapter.adapter0.weight",
            "hidden_adapter.adapter2.weight"} <= keys
    assert not any(k.startswith("teacher") for k in keys)  # the teacher is never saved
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert not any(p is q for p in m.parameters() for q in m.teacher.parameters())
    # same heads and adapter off: identity, as the original's use_attn_adapter=False
    student, teacher = MaskedAutoencoderViT(**STUDENT), MaskedAutoencoderViT(**{**TEACHER, "num_heads": 6, "embed_dim": 24})
    same = MAEDistill(student, teacher, attn_idx=(2,), use_attn_adapter=False)
    assert isinstance(same.attn_adapter["adapter1"], nn.Identity)
    forced = MAEDistill(MaskedAutoencoderViT(**STUDENT), MaskedAutoencoderViT(**TEACHER), attn_idx=(2,),
                        use_attn_adapter=False)  # 6 vs 4 heads: the adapter is forced on
    assert isinstance(forced.attn_adapter["adapter1"], nn.Conv2d)


def test_total_loss_equals_hand_computation():
    m = tiny_pair(attn_idx=(1, 2), attn_alpha=0.7, hidden_idx=(1, 2), hidden_alpha=0.3)
    imgs = torch.randn(2, 3, 16, 16)
    caught = {}
    for net, key in ((m.model, "s"), (m.teacher, "t")):
        for i in (0, 1):
            on_logits(net.blocks[i].attn, lambda o, key=key, i=i: caught.__setitem__((key, "attn", i), o.detach()))
        net.blocks[1].norm1.register_forward_hook(lambda mod, inp, o, key=key: caught.__setitem__((key, "hid", 1), o.detach()))
    m.model.norm.register_forward_hook(lambda mod, inp, o: caught.__setitem__(("s", "hid", 2), o.detach()))
    m.teacher.blocks[2].norm1.register_forward_hook(lambda mod, inp, o: caught.__setitem__(("t", "hid", 2), o.detach()))
    rec = spy(m)
    loss, logs = m(imgs)
    mae_loss = m.model(imgs, 0.75, rec["student_ids"])[0]  # same visible set -> the same MAE loss
    attn = 0.0
    for i in (0, 1):
        W = m.attn_adapter[f"adapter{i}"].weight[:, :, 0, 0]  # [teacher heads, student heads]
        mapped = torch.einsum("oh,bhij->boij", W, caught[("s", "attn", i)])
        attn = attn + ((mapped - caught[("t", "attn", i)]) ** 2).mean()
    hidden = 0.0
    for i in (1, 2):  # layer 2 is the student's final norm (depth 2) but the teacher's blocks[2].norm1 (depth 3)
        mapped = caught[("s", "hid", i)] @ m.hidden_adapter[f"adapter{i}"].weight.T
        hidden = hidden + ((mapped - caught[("t", "hid", i)]) ** 2).mean()
    torch.testing.assert_close(logs["mae"], mae_loss.detach())
    torch.testing.assert_close(logs["attn"], attn.detach())
    torch.testing.assert_close(logs["hidden"], hidden.detach())
    torch.testing.assert_close(loss.detach(), (mae_loss + 0.7 * attn + 0.3 * hidden).detach())


def test_steps_leave_teacher_bit_identical_and_train_student_and_adapter():
    m = tiny_pair()
    teacher_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    adapter_before = m.attn_adapter["adapter1"].weight.detach().clone()
    block_before = m.model.blocks[1].attn.qkv.weight.detach().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m.train()
    assert not m.teacher.training
    for _ in range(3):
        loss, _ = m(torch.randn(4, 3, 16, 16))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in m.teacher.parameters())
        opt.step()
    for k, v in m.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not torch.equal(m.attn_adapter["adapter1"].weight, adapter_before)
    assert not torch.equal(m.model.blocks[1].attn.qkv.weight, block_before)
    m.to(torch.float64)  # the teacher follows the method's moves although it is not a child module
    assert m.teacher.blocks[0].attn.qkv.weight.dtype == torch.float64


# ----- recipe, teacher files, CLI -------------------------------------------------------------------
RECIPE = dict(dataset="demo", img_size=32, patch_size=8, depth=2, teacher_arch="mae_vit_tiny_patch16", teacher_depth=2,
              distill_attn_idx=(2,), demo_samples=32, num_workers=0, print_interval=1, vis_images=0)


def official_teacher_file(path: Path, depth: int = 2, with_decoder: bool = False) -> Path:
    """A teacher in the official MAE release format: {"model": flat encoder keys}."""
    torch.manual_seed(1)
    net = timm.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=depth)
    state = {k: v for k, v in net.state_dict().items() if with_decoder or not (k.startswith("decoder") or k == "mask_token")}
    torch.save({"model": state}, path)
    return path


def test_recipe_values_and_alias():
    assert resolve_recipe("mae_lite_distill_exp.py") is MaeLiteDistill
    r = MaeLiteDistill()
    assert (r.teacher_arch, r.teacher_weights_prefix, r.distill_attn_idx, r.distill_attn_alpha) == \
        ("mae_vit_base_patch16", "", (12,), 1.0)
    assert (r.distill_hidden_idx, r.distill_hidden_alpha, r.use_attn_adapter, r.use_hidden_adapter) == ((), 1.0, True, True)
    # everything else is the mae_lite recipe (4.1)
    assert (r.encoder_arch, r.mask_ratio, r.max_epoch, r.batch_size, r.warmup_epochs) == \
        ("mae_vit_tiny_patch16", 0.75, 400, 4096, 40)
    assert r.opt_betas == (0.9, 0.95) and r.scaled_lr == pytest.approx(1.5e-4 * 4096 / 256)
    r.update({"distill_attn_idx": "(3, 12)", "distill_hidden_idx": "0,12"})
    assert r.distill_attn_idx == (3, 12) and r.distill_hidden_idx == (0, 12)


@pytest.mark.parametrize("options, words", [
    ({"distill_attn_idx": "(13,)"}, ["distill_attn_idx 13", "1..12"]),
    ({"distill_attn_idx": "(0,)"}, ["distill_attn_idx 0"]),
    ({"distill_hidden_idx": "(13,)"}, ["distill_hidden_idx 13"]),
    ({"distill_attn_idx": "()"}, ["nothing to distil", "mae_lite"]),
    ({"teacher_arch": "vit_base_patch16"}, ["teacher_arch", "mae_vit_base_patch16"]),
])
def test_recipe_refuses_bad_options(options, words):
    r = MaeLiteDistill()
    with pytest.raises(Exception) as info:
        r.update(options)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert r.distill_attn_idx == (12,)  # a refused update changes nothing


def test_teacher_in_official_format_and_our_format_are_read(tmp_path):
    off = official_teacher_file(tmp_path / "mae_official.pth", with_decoder=True)
    r = MaeLiteDistill(**RECIPE, teacher_ckpt_path=str(off))
    teacher = r.build_teacher()
    ref = torch.load(off, weights_only=True)["model"]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert not hasattr(teacher, "decoder_blocks") and not hasattr(teacher, "mask_token")
    # one of our pre-training checkpoints (`model.*` keys) works with the default prefix too
    save_checkpoint({"model": {f"model.{k}": v for k, v in ref.items()}}, tmp_path / "ours.pth.tar")
    teacher2 = MaeLiteDistill(**RECIPE, teacher_ckpt_path=str(tmp_path / "ours.pth.tar")).build_teacher()
    assert torch.equal(teacher2.blocks[1].mlp.fc2.weight, ref["blocks.1.mlp.fc2.weight"])
    # facebookresearch/mae's training checkpoints also hold an argparse.Namespace of the run's arguments
    torch.save({"model": ref, "epoch": 1599, "args": argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4)},
               tmp_path / "checkpoint-1599.pth")
    teacher3 = MaeLiteDistill(**RECIPE, teacher_ckpt_path=str(tmp_path / "checkpoint-1599.pth")).build_teacher()
    assert torch.equal(teacher3.blocks[0].attn.qkv.weight, ref["blocks.0.attn.qkv.weight"])


def test_missing_or_mismatched_teacher_is_a_one_line_error_before_training(tmp_path, capsys):
    base = ["-d", "cpu", "-f", "mae_lite_distill", "-b", "8", "-e", "1", "--exp-options", f"output_dir={tmp_path}",
            "exp_name=bad", *[f"{k}={v}" for k, v in RECIPE.items()]]
    cases = [
        ([], ["teacher_ckpt_path", "mae_base_1600e"]),
        ([f"teacher_ckpt_path={tmp_path / 'nope.pth'}"], ["not found", "nope.pth"]),
        ([f"teacher_ckpt_path={official_teacher_file(tmp_path / 'd3.pth', depth=3)}", "teacher_arch=mae_vit_small_patch16"],
         ["does not fit mae_vit_small_patch16", "of another shape"]),
        ([f"teacher_ckpt_path={official_teacher_file(tmp_path / 'd1.pth', depth=1)}"], ["missing", "blocks.1"]),
    ]
    for extra, words in cases:
        capsys.readouterr()
        assert ssl_train(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and all(w in err for w in words), err
        assert not (tmp_path / "bad" / "last_epoch_ckpt.pth.tar").exists()


def test_single_process_run_resume_and_finetune_from_distilled_checkpoint(tmp_path):
    teacher = official_teacher_file(tmp_path / "teacher.pth")
    opts = [f"{k}={v}" for k, v in RECIPE.items()] + [f"teacher_ckpt_path={teacher}", f"output_dir={tmp_path}"]
    args = ["-d", "cpu", "-f", "mae_lite_distill_exp.py", "-b", "8"]
    assert ssl_train([*args, "-e", "2", "--exp-options", *opts, "exp_name=straight"]) == 0
    assert ssl_train([*args, "-e", "1", "--exp-options", *opts, "exp_name=split"]) == 0
    assert ssl_train([*args, "-e", "2", "--resume", "--exp-options", *opts, "exp_name=split"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "last_epoch_ckpt.pth.tar")
    b = load_checkpoint(tmp_path / "split" / "last_epoch_ckpt.pth.tar")
    assert "attn_adapter.adapter1.weight" in a["model"] and not any(k.startswith(("teacher", "tch_model")) for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # resume is exact, with the teacher rebuilt from file
    log = next((tmp_path / "straight").glob("train_log-*.txt")).read_text()
    assert " | mae " in log and " | attn " in log and "teacher mae_vit_tiny_patch16 from" in log
    # fine-tuning from the distilled checkpoint: exactly like from a plain MAE one
    ft = FinetuneMAE(encoder_arch="vit_tiny_patch16", img_size=32, patch_size=8, depth=2, num_classes=3)
    net = ft.build_model().model
    report = load_pretrained(net, a, prefix="model", drop=("decoder", "mask_token", "head"))
    assert not any("adapter" in k for k in report.loaded + report.skipped)
    assert torch.equal(net.blocks[1].attn.qkv.weight, a["model"]["model.blocks.1.attn.qkv.weight"])
    assert {k for k in report.missing} <= {"pos_embed", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def test_original_distilled_checkpoint_with_teacher_keys_loads_for_finetuning(tmp_path):
    student = timm.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2)
    teacher = timm.create_model("mae_vit_base_patch16", img_size=32, patch_size=8, depth=1)
    state = {f"module.model.{k}": v for k, v in student.state_dict().items()}
    state.update({f"module.tch_model.{k}": v for k, v in teacher.state_dict().items()})
    state["module.attn_adapter.adapter11.weight"] = torch.zeros(12, 12, 1, 1)
    path = tmp_path / "mae_tiny_distill_400e.pth.tar"
    torch.save({"model": state, "start_epoch": 400}, path)
    ft = FinetuneMAE(encoder_arch="vit_tiny_patch16", img_size=32, patch_size=8, depth=2, num_classes=3)
    method = ft.build_model()
    summary = ft.load_initial_weights(method, str(path))
    assert "loaded" in summary
    assert torch.equal(method.model.blocks[0].mlp.fc1.weight, student.blocks[0].mlp.fc1.weight)
    assert torch.equal(method.model.patch_embed.proj.weight, student.patch_embed.proj.weight)


def test_two_process_gloo_run(tmp_path):
    teacher = official_teacher_file(tmp_path / "teacher.pth")
    opts = [f"{k}={v}" for k, v in RECIPE.items()] + [f"teacher_ckpt_path={teacher}", f"output_dir={tmp_path}",
                                                       "exp_name=ddp", "distill_hidden_idx=(1,)"]
    cmd = [sys.executable, "-m", "mae_lite.cli.train", "-d", "cpu:2", "-f", "mae_lite_distill", "-b", "8", "-e", "1",
           "--exp-options", *opts]
    proc = run_process(cmd)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last_epoch_ckpt.pth.tar")
    assert len(ckpt["rng"]) == 2 and "hidden_adapter.adapter1.weight" in ckpt["model"]
    assert ckpt["scheduler"]["last_count"] == 32 // 8 - 1  # 32 images, 2 x 4 per step -> 4 steps
    assert "world size 2" in out + err
