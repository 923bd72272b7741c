"""MoCo-v3 baseline (fact sheet 3.4, 4.9, 6): model, momentum, loss, synced BN, views, runs, fine-tuning."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from torchvision import transforms as T

from mae_lite.cli.train import main as ssl_train
from mae_lite.data import DemoPhotos
from mae_lite.data.ssl_transforms import ssl_transform
from mae_lite.engine.checkpoint import load_checkpoint
from mae_lite.errors import UserError
from mae_lite.methods.mocov3 import AllReduceBatchNorm1d, MoCoV3, contrastive_loss, cosine_momentum
from mae_lite.models.mocov3 import VisionTransformerMoCo, mocov3_sincos_2d
from mae_lite.models.pos_embed import sincos_2d
from mae_lite.recipes import Finetune, resolve_recipe
from mae_lite.recipes.mocov3 import MoCoV3Recipe
from _proc import run_process

TINY = ["dataset=demo", "img_size=32", "patch_size=8", "depth=2", "moco_dim=16", "moco_mlp_dim=32",
        "demo_samples=16", "num_workers=0", "print_interval=1"]


def tiny_method(**kw) -> MoCoV3:
    enc = timm.create_model("mocov3_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, num_classes=32)
    return MoCoV3(enc, dim=16, mlp_dim=32, **kw)


# ----- model -------------------------------------------------------------------------------------
def test_pos_embed_is_moco_formula_frozen_and_transposed_mae_table():
    dim, g = 16, 4
    # MoCo-v3's construction, written out: meshgrid of (w, h) with 'ij' indexing, [sin w, cos w, sin h, cos h]
    gw, gh = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ow, oh = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega
    expected = torch.cat([torch.zeros(1, dim), torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1)])
    table = mocov3_sincos_2d(dim, g)
    assert table.shape == (1, 1 + g * g, dim)
    torch.testing.assert_close(table[0], expected, atol=1e-6, rtol=0)
    # patch 1 is row 0, column 1: the first half (MoCo's "w") is the row, the transpose of MAE's table
    assert torch.equal(table[0, 2, :dim // 2], table[0, 1, :dim // 2]) and not torch.equal(table[0, 2], table[0, 1])
    mae = sincos_2d(dim, g).reshape(g, g, dim).transpose(0, 1).reshape(g * g, dim)
    torch.testing.assert_close(table[0, 1:], mae, atol=1e-6, rtol=0)

    net = timm.create_model("mocov3_vit_tiny_patch16", img_size=32, patch_size=8, depth=1)
    assert not net.pos_embed.requires_grad and torch.equal(net.pos_embed, mocov3_sincos_2d(192, 4))


def test_tiny_arch_init_and_cls_token_output():
    net = timm.create_model("mocov3_vit_tiny_patch16", num_classes=1000)
    assert isinstance(net, VisionTransformerMoCo)
    assert (net.embed_dim, len(net.blocks), net.blocks[0].attn.num_heads, net.patch_embed.patch_size) == (192, 12, 12, (16, 16))
    d, p = 192, 16
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    count = (3 * p * p * d + d) + d + 197 * d + 12 * block + 2 * d + (d * 1000 + 1000)
    assert count == 5_717_416 and "pos_embed" in dict(net.named_buffers())  # the fixed table is a buffer
    assert sum(t.numel() for t in net.parameters()) == count - 197 * d
    qkv = net.blocks[0].attn.qkv.weight
    bound_qkv = math.sqrt(6 / (d + d))  # q, k, v as three d x d matrices
    assert bound_qkv * 0.99 < qkv.abs().max() <= bound_qkv  # xavier over [3d, d] would stay below sqrt(6 / 4d)
    fc1 = net.blocks[0].mlp.fc1.weight
    assert math.sqrt(6 / (5 * d)) * 0.99 < fc1.abs().max() <= math.sqrt(6 / (5 * d))
    pe = net.patch_embed.proj.weight
    assert math.sqrt(6 / (3 * p * p + d)) * 0.99 < pe.abs().max() <= math.sqrt(6 / (3 * p * p + d))
    assert all(not m.bias.any() for m in net.modules() if isinstance(m, nn.Linear))
    assert not net.patch_embed.proj.bias.any() and net.cls_token.abs().max() < 1e-5
    keys = set(net.state_dict())
    assert net.global_pool == "token" and "norm.weight" in keys and not any(k.startswith("fc_norm") for k in keys)

    small = timm.create_model("mocov3_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), small.head(small.forward_features(x)[:, 0]))  # timm: features end with norm
    frozen = timm.create_model("mocov3_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, stop_grad_conv1=True)
    assert not any(q.requires_grad for q in frozen.patch_embed.parameters())
    assert timm.create_model("mocov3_vit_small_patch16", depth=1).blocks[0].attn.num_heads == 6


# ----- method: momentum, loss, EMA, keys ---------------------------------------------------------
def test_momentum_schedule_start_middle_end():
    assert cosine_momentum(0, 1000, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(500, 1000, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(250, 1000, 0.99) == pytest.approx(1 - 0.5 * (1 + math.sqrt(0.5)) * 0.01)
    assert cosine_momentum(1000, 1000, 0.99) == pytest.approx(1.0)
    method = tiny_method(base_momentum=0.9)
    method.set_progress(3, 6)
    assert method.momentum == pytest.approx(0.95)


def test_contrastive_loss_by_hand():
    # unit rows q1=(1,0), q2=(0,1); k1=(1,0), k2=(0.6,0.8); T=0.5 -> logits [[2, 1.2], [0, 1.6]], labels 0, 1
    q = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # scaled rows: the loss normalises them
    k = torch.tensor([[2.0, 0.0], [0.6, 0.8]])
    ce = 0.5 * (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6)))
    assert contrastive_loss(q, k, 0.5).item() == pytest.approx(ce * 2 * 0.5, rel=1e-6)
    # the 2T factor: at T=0.2 the logits are 5 q.k and the mean cross-entropy is multiplied by 0.4
    ce2 = 0.5 * (math.log(1 + math.exp(5 * 0.6 - 5)) + math.log(1 + math.exp(-5 * 0.8)))
    assert contrastive_loss(q, k, 0.2).item() == pytest.approx(ce2 * 0.4, rel=1e-6)


def test_symmetric_loss_and_momentum_encoder_moves_by_ema_only():
    torch.manual_seed(0)
    method = tiny_method(temperature=0.2, base_momentum=0.99)
    with torch.no_grad():  # make the two encoders differ, as after some training
        for p in method.base_encoder.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    old_m = [p.clone() for p in method.momentum_encoder.parameters()]
    base = [p.clone() for p in method.base_encoder.parameters()]
    method.set_progress(1, 4)
    m = cosine_momentum(1, 4, 0.99)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, logs = method((x1, x2))
    loss.backward()
    assert logs == {"momentum": pytest.approx(m)}
    for pm, om, pb in zip(method.momentum_encoder.parameters(), old_m, base):
        assert not pm.requires_grad and pm.grad is None
        torch.testing.assert_close(pm, m * om + (1 - m) * pb)
    assert all(p.grad is not None for p in method.base_encoder.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in method.predictor.parameters())
    # the loss is ctr(q1, k2) + ctr(q2, k1) with the updated momentum encoder (its BN running stats move twice more)
    method.train()
    with torch.no_grad():
        q1, q2 = method.predictor(method.base_encoder(x1)), method.predictor(method.base_encoder(x2))
        k1, k2 = method.momentum_encoder(x1), method.momentum_encoder(x2)
    expected = contrastive_loss(q1, k2, 0.2) + contrastive_loss(q2, k1, 0.2)
    method.momentum = 1.0  # no further move
    again, _ = method((x1, x2))
    torch.testing.assert_close(again, expected)


def test_keys_heads_and_model_property():
    method = tiny_method()
    prefixes = {k.split(".")[0] for k in method.state_dict()}
    assert prefixes == {"base_encoder", "momentum_encoder", "predictor"}
    assert method.model is method.base_encoder
    proj = method.base_encoder.head
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear)) and not proj[-1].affine and proj[1].affine
    assert (proj[0].in_features, proj[0].out_features, proj[6].out_features) == (192, 32, 16)
    pred = method.predictor
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert (pred[0].in_features, pred[3].out_features, pred[-1].affine) == (16, 16, False)
    assert "predictor" not in dict(method.momentum_encoder.named_children())
    with pytest.raises(ValueError, match="two views"):
        method(torch.randn(2, 3, 32, 32))


# ----- DDP pieces: gathered keys with rank-offset labels, synchronised BatchNorm ------------------
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # every rank draws the same full batch, then takes its rows
    q, k, x, w = torch.randn(8, 5), torch.randn(8, 5), torch.randn(8, 6), torch.randn(8, 6)
    rows = slice(4 * rank, 4 * rank + 4)
    loss = contrastive_loss(q[rows], k[rows], 0.2)
    bn = AllReduceBatchNorm1d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        bn.bias.copy_(torch.linspace(-1, 1, 6))
    xr = x[rows].clone().requires_grad_(True)
    y = bn(xr)
    (y * w[rows]).sum().backward()
    norm_type = type(tiny_method(sync_bn=True).predictor[1]).__name__
    torch.save({"loss": loss, "y": y.detach(), "xgrad": xr.grad, "wgrad": bn.weight.grad, "bgrad": bn.bias.grad,
                "running": (bn.running_mean, bn.running_var), "norm": norm_type}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_full_batch(tmp_path):
    from mae_lite.engine.dist import free_port

    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    torch.manual_seed(0)
    q, k, x, w = torch.randn(8, 5), torch.randn(8, 5), torch.randn(8, 6), torch.randn(8, 6)
    # mean of the per-rank losses (what DDP's gradient averaging optimises) = the one-process loss on 8 images
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, contrastive_loss(q, k, 0.2))
    assert not torch.allclose(r[0]["loss"], contrastive_loss(q[:4], k[:4], 0.2))  # keys of rank 1 took part
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        bn.bias.copy_(torch.linspace(-1, 1, 6))
    x = x.requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    torch.testing.assert_close(torch.cat([r[0]["y"], r[1]["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r[0]["xgrad"], r[1]["xgrad"]]), x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r[0]["wgrad"] + r[1]["wgrad"], bn.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r[0]["bgrad"] + r[1]["bgrad"], bn.bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r[0]["running"][0], bn.running_mean)
    torch.testing.assert_close(r[0]["running"][1], bn.running_var)
    assert r[0]["norm"] == "AllReduceBatchNorm1d"  # SyncBatchNorm under gloo, plain BatchNorm1d in one process
    assert type(tiny_method(sync_bn=False).predictor[1]) is nn.BatchNorm1d


# ----- views and recipe --------------------------------------------------------------------------
def test_ssl_transform_two_asymmetric_views():
    tf = ssl_transform(32)
    (v1, v2), label = DemoPhotos(tf, samples_per_epoch=3)[1]
    assert v1.shape == v2.shape == (3, 32, 32) and label == 1 and not torch.equal(v1, v2)

    def parts(view):
        return view.transforms

    def find(view, kind):
        hits = [t for t in parts(view) if isinstance(t, kind)]
        hits += [(t.p, s) for t in parts(view) if isinstance(t, T.RandomApply) for s in t.transforms if isinstance(s, kind)]
        return hits

    for view in (tf.t1, tf.t2):
        rrc = parts(view)[0]
        assert isinstance(rrc, T.RandomResizedCrop) and rrc.scale == (0.08, 1.0) and rrc.size == (32, 32)
        (p_cj, cj), = find(view, T.ColorJitter)
        assert p_cj == 0.8
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert [t.p for t in parts(view) if isinstance(t, T.RandomGrayscale)] == [0.2]
        assert [t.p for t in parts(view) if isinstance(t, T.RandomHorizontalFlip)] == [0.5]
    blur1, = find(tf.t1, T.GaussianBlur)
    assert isinstance(blur1, T.GaussianBlur) and blur1.sigma == (0.1, 2.0)  # always applied on view 1
    (p_blur2, blur2), = find(tf.t2, T.GaussianBlur)
    assert p_blur2 == 0.1 and blur2.sigma == (0.1, 2.0)
    assert not find(tf.t1, T.RandomSolarize)
    sol, = find(tf.t2, T.RandomSolarize)
    assert sol.p == 0.2 and sol.threshold == 128


def test_recipe_values_match_the_fact_sheet():
    r = MoCoV3Recipe()
    assert resolve_recipe("mocov3") is resolve_recipe("mocov3_exp.py") is resolve_recipe("mocov3_exp") is MoCoV3Recipe
    assert (r.encoder_arch, r.stop_grad_conv1, r.moco_dim, r.moco_mlp_dim, r.moco_m, r.moco_t) == \
        ("mocov3_vit_tiny_patch16", False, 256, 4096, 0.99, 0.2)
    assert (r.opt, r.opt_betas, r.weight_decay, r.warmup_epochs, r.warmup_lr, r.min_lr) == \
        ("adamw", (0.9, 0.999), 0.1, 40, 1e-6, 0.0)
    assert (r.batch_size, r.max_epoch, r.num_workers, r.seed, r.img_size) == (1024, 400, 6, 0, 224)
    assert r.scaled_lr == pytest.approx(6e-4)
    method = MoCoV3Recipe(depth=1).build_model()
    assert (method.base_encoder.head[0].out_features, method.base_encoder.head[6].out_features) == (4096, 256)
    assert (method.temperature, method.base_momentum) == (0.2, 0.99)
    opt = MoCoV3Recipe().build_optimizer(tiny_method())
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1  # biases and norms too
    trainable = {id(p) for p in tiny_method().parameters() if p.requires_grad}
    assert len(opt.param_groups[0]["params"]) == len(trainable)
    for bad in ({"moco_t": "0"}, {"moco_m": "1.5"}, {"encoder_arch": "vit_tiny_patch16"}, {"img_size": "30"}):
        with pytest.raises(UserError):
            MoCoV3Recipe(**bad)


# ----- runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moco_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moco")
    assert ssl_train(["-d", "cpu", "-f", "mocov3", "-b", "8", "-e", "2", "--exp-options", f"output_dir={out}",
                      "exp_name=pre", *TINY]) == 0
    return out


def test_one_process_run(moco_run):
    ckpt = load_checkpoint(moco_run / "pre" / "last_epoch_ckpt.pth.tar")
    assert {k.split(".")[0] for k in ckpt["model"]} == {"base_encoder", "momentum_encoder", "predictor"}
    assert ckpt["start_epoch"] == 2 and ckpt["scheduler"]["last_count"] == 3  # 16 images / 8 -> 2 steps x 2
    assert ckpt["arch"] == {"name": "mocov3_vit_tiny_patch16", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
    key = "blocks.0.mlp.fc1.weight"
    assert not torch.equal(ckpt["model"][f"base_encoder.{key}"], ckpt["model"][f"momentum_encoder.{key}"])  # apart
    log = next((moco_run / "pre").glob("train_log-*.txt")).read_text()
    assert f"momentum {cosine_momentum(3, 4):.4f}" in log  # the loop's set_progress drove the schedule


def test_two_process_gloo_run(tmp_path):
    cmd = [sys.executable, "-m", "mae_lite.cli.train", "-d", "cpu:2", "-f", "mocov3", "-b", "8", "-e", "1",
           "--exp-options", f"output_dir={tmp_path}", "exp_name=ddp", *TINY]
    proc = run_process(cmd)
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last_epoch_ckpt.pth.tar")
    assert {k.split(".")[0] for k in ckpt["model"]} == {"base_encoder", "momentum_encoder", "predictor"}
    assert ckpt["scheduler"]["last_count"] == 1 and len(ckpt["rng"]) == 2  # 16 images / (2 x 4) -> 2 steps
    assert "world size 2" in stdout + stderr


def test_checkpoint_fine_tunes_with_base_encoder_prefix(moco_run):
    src = moco_run / "pre" / "last_epoch_ckpt.pth.tar"
    opts = ["pretrain_exp_name=pre", "weights_prefix=base_encoder", "layer_decay=0.75", "dataset=demo", "img_size=32",
            "patch_size=8", "depth=2", "num_classes=13", "demo_samples=16", "eval_limit=8", "num_workers=0"]
    recipe = Finetune(**dict(o.split("=") for o in opts), output_dir=str(moco_run))
    method = recipe.build_model()
    summary = recipe.load_initial_weights(method, str(src))
    state, net = load_checkpoint(src)["model"], method.model.state_dict()
    encoder_keys = [k for k in net if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed"))]
    assert len([k for k in encoder_keys if k.startswith("blocks.")]) == 2 * 12
    for key in encoder_keys:
        assert torch.equal(net[key], state[f"base_encoder.{key}"]), key
    assert f"loaded {len(encoder_keys)} tensors" in summary and not net["head.weight"].any()  # projector not loaded
    assert ssl_train(["-d", "cpu", "-f", "finetuning", "-b", "8", "-e", "1", "--ckpt", str(src), "--exp-options",
                      f"output_dir={moco_run}", *opts]) == 0
    log = next((moco_run / "pre" / "ft_eval").glob("train_log-*.txt")).read_text()
    assert f"loaded {len(encoder_keys)} tensors" in log and "Top1" in log


def test_resume_continues_bit_identically(tmp_path):
    # moco_m=1 keeps the momentum independent of -e, so a 1+1-epoch run must equal a 2-epoch run exactly
    # (optimizer, BN statistics, momentum encoder and random streams all restored)
    opts = ["--exp-options", f"output_dir={tmp_path}", "moco_m=1.0", *TINY, "demo_samples=8"]  # 1 step per epoch
    assert ssl_train(["-d", "cpu", "-f", "mocov3", "-b", "8", "-e", "2", *opts, "exp_name=straight"]) == 0
    assert ssl_train(["-d", "cpu", "-f", "mocov3", "-b", "8", "-e", "1", *opts, "exp_name=split"]) == 0
    assert ssl_train(["-d", "cpu", "-f", "mocov3", "-b", "8", "-e", "2", "--resume", *opts, "exp_name=split"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "last_epoch_ckpt.pth.tar")["model"]
    b = load_checkpoint(tmp_path / "split" / "last_epoch_ckpt.pth.tar")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
