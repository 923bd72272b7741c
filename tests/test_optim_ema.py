"""GPU-scale pieces that a CPU can check: AdamW's kernel choice (fused on CUDA, foreach elsewhere) with today's
numbers, MoCo's momentum update as one foreach lerp, checkpoint file modes, EMA weight selection (--ema), kNN kept
on the device."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from mae_lite.analysis import knn
from mae_lite.cli.eval import main as ssl_eval
from mae_lite.cli.export import main as ssl_export
from mae_lite.engine.checkpoint import load_pretrained, save_checkpoint, select_weights
from mae_lite.engine.optim import adamw_kernel, build_optimizer, param_groups
from mae_lite.errors import UserError
from mae_lite.methods.mocov3 import MoCoV3
from mae_lite.models import VisionTransformer

TINY = ["img_size=32", "patch_size=4", "depth=2", "num_classes=2", "num_workers=0"]
CFG = SimpleNamespace(opt="adamw", scaled_lr=1e-2, opt_betas=(0.9, 0.95), opt_eps=1e-8)


# ----- AdamW: fused on CUDA, foreach elsewhere ------------------------------------------------------------
def test_adamw_kernel_is_fused_on_cuda_and_foreach_elsewhere():
    assert adamw_kernel("cuda") == {"fused": True}
    assert adamw_kernel("cpu") == {"foreach": True} == adamw_kernel("mps")
    opt = build_optimizer(param_groups(torch.nn.Linear(3, 2), 0.05), CFG)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def _train(make_opt, steps: int = 5) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    opt = make_opt(param_groups(net, 0.05))
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in opt.param_groups:  # as the schedule does: a new lr every step
            group["lr"] = CFG.scaled_lr * (step + 1) / steps
        x, y = torch.randn(4, 8, generator=g), torch.randint(3, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt


def test_adamw_foreach_and_fused_give_todays_weights():
    """Today's AdamW (torch's CPU default, a per-parameter loop) vs ours (foreach) and the fused kernel (on the CPU,
    standing in for CUDA's): same weights and moments after the same steps, to float tolerance."""
    def today(groups):
        return torch.optim.AdamW(groups, lr=CFG.scaled_lr, betas=CFG.opt_betas, eps=CFG.opt_eps)

    ref, ref_opt = _train(today)
    assert not ref_opt.defaults["foreach"]
    ours, ours_opt = _train(lambda groups: build_optimizer(groups, CFG))
    fused, _ = _train(lambda groups: torch.optim.AdamW(groups, lr=CFG.scaled_lr, betas=CFG.opt_betas,
                                                       eps=CFG.opt_eps, fused=True))
    for other in (ours, fused):
        for a, b in zip(ref.parameters(), other.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ref_state, our_state = ref_opt.state_dict()["state"], ours_opt.state_dict()["state"]
    assert sorted(ref_state) == sorted(our_state)
    for i in ref_state:
        assert float(ref_state[i]["step"]) == float(our_state[i]["step"]) == 5
        torch.testing.assert_close(ref_state[i]["exp_avg_sq"], our_state[i]["exp_avg_sq"])


@pytest.mark.cuda
def test_adamw_is_fused_on_cuda_and_matches_the_cpu():
    cpu, _ = _train(lambda groups: build_optimizer(groups, CFG))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)).cuda()
    opt = build_optimizer(param_groups(net, 0.05), CFG)
    assert opt.defaults["fused"] is True
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        for group in opt.param_groups:
            group["lr"] = CFG.scaled_lr * (step + 1) / 5
        x, y = torch.randn(4, 8, generator=g), torch.randint(3, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x.cuda()), y.cuda()).backward()
        opt.step()
    for a, b in zip(cpu.parameters(), net.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)


# ----- MoCo momentum update -------------------------------------------------------------------------------
def test_momentum_update_is_one_foreach_lerp_equal_to_the_loop_formula(monkeypatch):
    torch.manual_seed(0)
    enc = timm.create_model("mocov3_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, num_classes=32)
    method = MoCoV3(enc, dim=16, mlp_dim=32)
    with torch.no_grad():
        for p in method.base_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = [p.clone() for p in method.momentum_encoder.parameters()]
    m = 0.97
    for p_m, p_b in zip(expected, method.base_encoder.parameters()):  # the old per-parameter formula
        p_m.mul_(m).add_(p_b.detach(), alpha=1.0 - m)
    calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: (calls.append(len(a[0])), lerp(*a))[1])
    method.update_momentum_encoder(m)
    assert calls == [len(expected)]  # one multi-tensor call for every parameter
    for got, want in zip(method.momentum_encoder.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ----- checkpoint file mode -------------------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_mode_follows_the_umask_and_the_write_stays_atomic(tmp_path, umask, mode):
    path = tmp_path / "ck" / "last_epoch_ckpt.pth.tar"
    old = os.umask(umask)
    try:
        save_checkpoint({"a": torch.ones(2)}, path)
        assert stat.S_IMODE(path.stat().st_mode) == mode
        with pytest.raises(Exception):  # a failing write (unpicklable) leaves the old file and no temporary
            save_checkpoint({"a": lambda: 0}, path)
    finally:
        os.umask(old)
    assert torch.load(path, weights_only=True)["a"].tolist() == [1.0, 1.0]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# ----- EMA weights (--ema) --------------------------------------------------------------------------------
def _vit(seed: int, head_bias: tuple[float, float]) -> VisionTransformer:
    """A tiny classifier; its zero head weight and `head_bias` make it predict one class for every image."""
    torch.manual_seed(seed)
    net = VisionTransformer(img_size=32, patch_size=4, depth=2, num_classes=2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor(head_bias))
    return net


@pytest.fixture
def ema_ckpt(tmp_path) -> tuple[Path, VisionTransformer, VisionTransformer]:
    """A checkpoint whose `model` predicts class 0 and whose `model_ema` (other weights) predicts class 1."""
    model, ema = _vit(0, (1.0, 0.0)), _vit(1, (0.0, 1.0))
    path = tmp_path / "ema.pth.tar"
    save_checkpoint({"model": {f"model.{k}": v for k, v in model.state_dict().items()},
                     "model_ema": {f"model.{k}": v for k, v in ema.state_dict().items()}}, path)
    return path, model, ema


@pytest.fixture
def folder(tmp_path) -> Path:
    """4 images of class a, 2 of class b: always-a scores 66.667 top-1, always-b 33.333."""
    rng = np.random.default_rng(0)
    for name, n in (("a", 4), ("b", 2)):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.random((36, 36, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    return tmp_path / "imgs"


def test_select_weights_and_load_pretrained_pick_model_ema(ema_ckpt):
    path, model, ema = ema_ckpt
    net = VisionTransformer(img_size=32, patch_size=4, depth=2, num_classes=2)
    report = load_pretrained(net, path, ema=True)
    assert not report.missing and not report.skipped
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, ema.state_dict()[k])
    load_pretrained(net, path)  # default: `model`
    torch.testing.assert_close(net.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    with pytest.raises(UserError, match=r"x\.pth has no EMA weights \('model_ema'\).*drop --ema"):
        select_weights({"model": {}}, True, "x.pth")


def test_ssl_eval_ema_evaluates_the_ema_weights(ema_ckpt, folder, capsys):
    path = ema_ckpt[0]
    args = ["-d", "cpu", "-b", "3", "-f", "finetuning", "--ckpt", str(path), "--exp-options", f"dataset=folder:{folder}",
            *TINY]
    assert ssl_eval(args) == 0 and capsys.readouterr().out.strip() == "Top1: 66.667, Top5: 100.000"
    assert ssl_eval([*args[:6], "--ema", *args[6:]]) == 0
    assert capsys.readouterr().out.strip() == "Top1: 33.333, Top5: 100.000"


def test_ema_asked_of_a_checkpoint_without_one_is_a_one_line_error(tmp_path, folder, capsys):
    path = tmp_path / "plain.pth.tar"
    save_checkpoint({"model": {f"model.{k}": v for k, v in _vit(0, (1.0, 0.0)).state_dict().items()}}, path)
    assert ssl_eval(["-d", "cpu", "--ema", "-f", "finetuning", "--ckpt", str(path), "--exp-options",
                     f"dataset=folder:{folder}", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ssl_eval: error: {path} has no EMA weights ('model_ema'): it was trained without "
                   "model_ema=True; drop --ema to use its 'model' weights")


def test_ssl_export_ema_writes_the_ema_weights(ema_ckpt, tmp_path, capsys):
    path, _, ema = ema_ckpt
    out = tmp_path / "export"
    assert ssl_export(["--ckpt", str(path), "--ema", "--out", str(out), "--exp-options", *TINY[:4]]) == 0
    saved = load_file(str(out / "model.safetensors"))
    for k in ("blocks.1.mlp.fc1.weight", "head.bias", "patch_embed.proj.weight"):
        torch.testing.assert_close(saved[k], ema.state_dict()[k])
    assert "(EMA weights, model_ema)" in (out / "README.md").read_text()


def test_ssl_train_ckpt_ema_starts_fine_tuning_from_the_ema_weights(ema_ckpt, tmp_path, monkeypatch):
    """The --ema flag reaches the recipe of the training process, whose initial weights are then the EMA's."""
    from mae_lite.cli import train as train_cli

    path, model, ema = ema_ckpt
    loaded = {}

    def fake_train(recipe, env, *, init_ckpt=None, **kw):
        method = recipe.build_model()
        recipe.load_initial_weights(method, init_ckpt)
        loaded.update(method.model.state_dict())

    monkeypatch.setattr(train_cli, "train", fake_train)
    assert train_cli.main(["-d", "cpu", "-f", "finetuning", "--ckpt", str(path), "--ema", "--exp-options", *TINY,
                           f"output_dir={tmp_path / 'out'}", "pretrain_exp_name=mae"]) == 0
    for k in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "patch_embed.proj.weight"):
        torch.testing.assert_close(loaded[k], ema.state_dict()[k])
    assert not torch.equal(loaded["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])


# ----- kNN on the device ----------------------------------------------------------------------------------
def _old_knn_predict(train_feats, train_labels, eval_feats, k, temperature, num_classes):
    """The CPU implementation before the memory bank moved to the device (one chunk)."""
    bank = F.normalize(train_feats.float(), dim=1)
    q = F.normalize(eval_feats.float(), dim=1)
    sim, idx = (q @ bank.T).topk(k, dim=1)
    votes = torch.zeros(len(q), num_classes)
    return votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())


def test_knn_scores_are_unchanged_in_chunks_and_with_a_bounded_similarity_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(300, 16, generator=g), torch.randint(5, (300,), generator=g)
    queries = torch.randn(70, 16, generator=g)
    want = _old_knn_predict(train, labels, queries, 20, 0.07, 5)  # votes up to exp(1 / 0.07): relative tolerance
    got = knn.knn_predict(train, labels, queries, 20, 0.07, 5, chunk=16, device="cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    monkeypatch.setattr(knn, "SIM_ELEMENTS", 1000)  # 3 queries per similarity block
    torch.testing.assert_close(knn.knn_predict(train, labels, queries, 20, 0.07, 5), want, rtol=1e-5, atol=0)


def test_knn_eval_keeps_features_on_the_device(monkeypatch):
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, num_classes=0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(3, (6,), generator=g)) for _ in range(3)]
    with torch.no_grad():
        feats = torch.cat([net.eval()(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    top = _old_knn_predict(feats, labels, feats, 5, 0.07, 3).topk(3, dim=1).indices
    want_top1 = 100.0 * top[:, 0].eq(labels).float().mean().item()
    moved = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **kw: (moved.append(self.shape), cpu(self, *a, **kw))[1])
    result = knn.knn_eval(net, batches, batches, "cpu", k=5)
    assert moved == []  # nothing copied to the host on the way
    assert result["top1"] == pytest.approx(want_top1) and result["train_images"] == 18
