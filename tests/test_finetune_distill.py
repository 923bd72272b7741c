"""DeiT-style distillation fine-tuning (fact sheet 4.7): losses, the distilled ViT, the teacher kept out."""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_lite.cli.eval import main as ssl_eval
from mae_lite.cli.train import main as ssl_train
from mae_lite.engine.checkpoint import load_checkpoint
from mae_lite.methods import Classify
from mae_lite.methods.classify_distill import ClassifyDistill, hard_distillation_loss, soft_distillation_loss
from mae_lite.recipes import resolve_recipe
from mae_lite.recipes.finetune_distill import FinetuneDistill

SMALL = dict(dataset="demo", img_size=32, patch_size=8, depth=2, num_classes=13, demo_samples=16, num_workers=0,
             teacher_arch="resnet10t", pretrain_exp_name="scratch/vit")


def teacher_file(path, num_classes: int = 13):
    torch.manual_seed(2)
    net = timm.create_model("resnet10t", num_classes=num_classes, global_pool="avg")
    torch.save({"model": net.state_dict()}, path)  # DeiT's teacher-file layout
    return path


def test_soft_and_hard_losses_equal_hand_computations():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.2, 0.1, 2.0], [1.0, 0.0, 0.0]])
    tau = 2.0
    ps, pt = torch.softmax(s / tau, 1), torch.softmax(t / tau, 1)
    kl = (pt * (pt.log() - ps.log())).sum()  # summed over batch and classes
    torch.testing.assert_close(soft_distillation_loss(s, t, tau), kl * tau ** 2 / 6)  # / numel = 2 x 3
    # hard: cross-entropy against the teacher's argmax (classes 2 and 0)
    hard = -(torch.log_softmax(s, 1)[0, 2] + torch.log_softmax(s, 1)[1, 0]) / 2
    torch.testing.assert_close(hard_distillation_loss(s, t), hard)


def test_distilled_vit_keys_heads_and_averaged_eval():
    r = FinetuneDistill(**{**SMALL, "num_classes": 3, "drop_path": 0.0})  # deterministic forwards
    net = r.build_network()
    keys = set(net.state_dict())
    assert {"dist_norm.weight", "dist_norm.bias", "head_dist.weight", "head_dist.bias", "fc_norm.weight"} <= keys
    assert "dist_token" not in keys and net.pos_embed.shape == (1, 1 + 16, 192)  # the class token is the dist token
    assert net.head_dist.weight.shape == (3, 192)
    torch.manual_seed(0)
    for p in (net.head.weight, net.head_dist.weight, net.dist_norm.weight):
        nn.init.normal_(p)
    x = torch.randn(2, 3, 32, 32)
    feats = net.forward_features(x)
    main = net.head(F.layer_norm(feats[:, 1:].mean(1), (192,), net.fc_norm.weight, net.fc_norm.bias, 1e-6))
    dist = net.head_dist(F.layer_norm(feats[:, 0], (192,), net.dist_norm.weight, net.dist_norm.bias, 1e-6))
    net.train()
    out = net(x)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], main)
    torch.testing.assert_close(out[1], dist)
    net.eval()
    torch.testing.assert_close(net(x), (main + dist) / 2)


def test_total_loss_teacher_sees_mixed_images_and_is_left_out(tmp_path):
    from timm.data import Mixup

    r = FinetuneDistill(**SMALL, teacher_ckpt_path=str(teacher_file(tmp_path / "t.pth")), distill_type="soft",
                        distill_tau=2.0, distill_alpha=0.3)
    m = r.build_model()
    assert isinstance(m, ClassifyDistill) and m.mixup is not None  # MAE-default recipe: mixup 0.8 / cutmix 1.0
    seen = {}
    m.teacher.register_forward_pre_hook(lambda mod, args: seen.__setitem__("t_in", args[0]))
    m.model.register_forward_pre_hook(lambda mod, args: seen.__setitem__("s_in", args[0]))
    m.teacher.register_forward_hook(lambda mod, args, out: seen.__setitem__("t_out", out))
    m.model.register_forward_hook(lambda mod, args, out: seen.__setitem__("s_out", out))
    m.mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, num_classes=13)
    m.train()
    assert not m.teacher.training
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    x0 = x.clone()  # timm's Mixup mixes in place
    loss, logs = m(x, y)
    assert torch.equal(seen["t_in"], seen["s_in"]) and not torch.equal(seen["s_in"], x0)  # mixed, the same for both
    logits, logits_dist = seen["s_out"]
    torch.testing.assert_close(logs["distill"], soft_distillation_loss(logits_dist, seen["t_out"], 2.0).detach())
    torch.testing.assert_close(loss.detach(), 0.7 * logs["base"] + 0.3 * logs["distill"])
    # the teacher is in neither the checkpoint nor the optimiser, and never changes
    assert not any(k.startswith(("teacher", "tch_model")) for k in m.state_dict())
    opt = r.build_optimizer(m)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in m.teacher.parameters()}
    assert in_opt == {id(p) for p in m.parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in m.teacher.state_dict().items())  # BN statistics too
    assert all(p.grad is None for p in m.teacher.parameters())


def test_recipe_values_none_type_and_refusals():
    for spec in ("finetuning_distill", "finetuning_distill_exp.py", "finetuning_distill_exp"):
        assert resolve_recipe(spec) is FinetuneDistill
    r = FinetuneDistill()
    assert (r.teacher_arch, r.distill_type, r.distill_alpha, r.distill_tau, r.max_epoch, r.save_folder_prefix) == \
        ("regnety_160", "hard", 0.5, 1.0, 300, "ft_distill_")
    assert (r.mixup, r.cutmix, r.reprob, r.smoothing, r.drop_path, r.layer_decay) == (0.8, 1.0, 0.25, 0.1, 0.1, 0.85)
    plain = FinetuneDistill(**SMALL, distill_type="none").build_model()  # no teacher needed, no distillation head
    assert type(plain) is Classify and not hasattr(plain.model, "head_dist")
    for options, words in [({"distill_type": "kl"}, ["distill_type", "none, soft, hard"]),
                           ({"global_pool": "false"}, ["global_pool=True"]),
                           ({"teacher_arch": "no_such_net"}, ["teacher_arch"])]:
        try:
            r.update(options)
            raise AssertionError(f"accepted {options}")
        except Exception as e:  # noqa: BLE001
            assert "\n" not in str(e) and all(w in str(e) for w in words), str(e)


def test_cli_run_and_missing_teacher_one_liner(tmp_path, capsys):
    opts = [f"{k}={v}" for k, v in SMALL.items()] + [f"output_dir={tmp_path}", "print_interval=1", "eval_limit=8"]
    base = ["-d", "cpu", "-f", "finetuning_distill", "-b", "8", "-e", "1", "--exp-options", *opts]
    for extra, words in [([], ["teacher_ckpt_path", "regnety_160"]),
                         ([f"teacher_ckpt_path={tmp_path / 'nope.pth'}"], ["not found", "nope.pth"]),
                         ([f"teacher_ckpt_path={teacher_file(tmp_path / 'c5.pth', 5)}"], ["does not fit", "13 classes"])]:
        capsys.readouterr()
        assert ssl_train(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and all(w in err for w in words), err
    assert ssl_train(base + [f"teacher_ckpt_path={teacher_file(tmp_path / 't.pth')}"]) == 0
    out = tmp_path / "scratch" / "vit" / "ft_distill_eval"
    ckpt = load_checkpoint(out / "last_epoch_ckpt.pth.tar")
    assert "model.head_dist.weight" in ckpt["model"] and "model.dist_norm.bias" in ckpt["model"]
    assert not any(k.startswith(("teacher", "tch_model")) for k in ckpt["model"])
    log = "".join(p.read_text() for p in out.glob("train_log-*.txt"))  # the refused runs logged there too
    assert "teacher resnet10t from" in log and " | distill " in log
    # ssl_eval builds the distilled ViT without a teacher and scores the averaged heads, as the run's evaluation
    capsys.readouterr()
    assert ssl_eval(["-d", "cpu", "-b", "8", "-f", "finetuning_distill_exp.py", "--ckpt", str(out / "last_epoch_ckpt.pth.tar"),
                     "--exp-options", *opts]) == 0
    assert f"Top1: {ckpt['best_top1']:.3f}" in capsys.readouterr().out


def test_teacher_from_safetensors_and_ddp_prefix(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    net = timm.create_model("resnet10t", num_classes=13, global_pool="avg")
    save_file(net.state_dict(), str(tmp_path / "model.safetensors"))  # timm's hub layout
    teacher = FinetuneDistill(**SMALL, teacher_ckpt_path=str(tmp_path / "model.safetensors")).build_teacher()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in teacher.state_dict().items())
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "ddp.pth")
    teacher = FinetuneDistill(**SMALL, teacher_ckpt_path=str(tmp_path / "ddp.pth")).build_teacher()
    assert torch.equal(teacher.conv1[0].weight, net.conv1[0].weight)
