"""Linear probe (facebookresearch/mae's protocol) as the recipe `linprobe` in the training loop."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import Lars

import mae_lite.models  # noqa: F401  (registers the architectures)
from mae_lite.cli.eval import main as ssl_eval
from mae_lite.cli.train import main as ssl_train
from mae_lite.engine.checkpoint import load_checkpoint, save_checkpoint
from mae_lite.errors import UserError
from mae_lite.recipes import resolve_recipe
from mae_lite.recipes.linprobe import LinProbe

SMALL = dict(dataset="demo", img_size=32, patch_size=8, depth=2, num_classes=13, demo_samples=16, num_workers=0)


def test_recipe_values_are_maes_linear_probe():
    r = LinProbe(pretrain_exp_name="mae_lite/mae_tiny_400e", output_dir="/o")
    assert resolve_recipe("linprobe_exp.py") is resolve_recipe("linprobe_exp") is resolve_recipe("linprobe") is LinProbe
    assert (r.opt, r.momentum, r.trust_coeff, r.weight_decay, r.batch_size) == ("lars", 0.9, 0.001, 0.0, 16384)
    assert r.scaled_lr == pytest.approx(0.1 * 16384 / 256)
    assert (r.max_epoch, r.warmup_epochs, r.min_lr, r.global_pool) == (90, 10, 0.0, False)
    assert str(r.output_path) == "/o/mae_lite/mae_tiny_400e/linprobe_eval"
    tf = LinProbe(pretrain_exp_name="p", **SMALL).build_datasets()["train"].transform
    assert type(tf).__name__ == "FastRandomResizedCrop" and (tf.hflip, tf.output) == (0.5, "uint8")  # RRC + flip
    assert tf.scale == (0.08, 1.0) and tf.interpolation == "bicubic"
    assert LinProbe(pretrain_exp_name="p", opt="sgd").opt == "sgd"
    with pytest.raises(UserError, match="'opt' must be 'lars' or 'sgd' or 'adamw'"):
        LinProbe(pretrain_exp_name="p", opt="adam")
    with pytest.raises(UserError, match="mixup"):
        LinProbe(pretrain_exp_name="p", mixup="0.8")


def test_head_is_batchnorm_without_affine_and_only_it_trains():
    method = LinProbe(pretrain_exp_name="p", drop="0.5", **SMALL).build_model()
    bn, fc = method.model.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert (fc.in_features, fc.out_features) == (192, 13)
    assert [n for n, p in method.named_parameters() if p.requires_grad] == ["model.head.1.weight", "model.head.1.bias"]
    method.train()
    assert method.training and method.model.head.training
    assert not any(m.training for n, m in method.model.named_modules() if not n.startswith("head"))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss1, _ = method(x, y)
    loss2, _ = method(x, y)
    assert loss1.item() == loss2.item()  # encoder dropout 0.5 is off: the frozen encoder runs in eval mode
    loss1.backward()
    assert all(p.grad is None for n, p in method.named_parameters() if "head" not in n)


def test_lars_step_by_hand():
    recipe = LinProbe(pretrain_exp_name="p", **SMALL)
    method = recipe.build_model()
    opt = recipe.build_optimizer(method)
    assert isinstance(opt, Lars)
    w, b = method.model.head[1].weight, method.model.head[1].bias
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn_like(w), torch.randn_like(b)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    lr = recipe.scaled_lr
    torch.testing.assert_close(w.detach(), w0 - lr * 0.001 * w0.norm() / gw.norm() * gw)  # trust ratio on the matrix
    torch.testing.assert_close(b.detach(), b0 - lr * gb)  # the bias is neither adapted nor decayed


def test_linprobe_through_ssl_train_leaves_the_encoder_bit_identical(tmp_path, capsys):
    torch.manual_seed(0)
    mae = timm.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, norm_pix_loss=True)
    src = tmp_path / "mae.pth.tar"
    save_checkpoint({"model": {f"module.model.{k}": v for k, v in mae.state_dict().items()}}, src)  # the original's keys
    opts = [f"output_dir={tmp_path}", "pretrain_exp_name=mae_run", "print_interval=1"] + [f"{k}={v}" for k, v in SMALL.items()]
    assert ssl_train(["-d", "cpu", "-f", "linprobe", "-b", "8", "-e", "1", "--ckpt", str(src), "--exp-options", *opts]) == 0
    out = tmp_path / "mae_run" / "linprobe_eval" / "last_epoch_ckpt.pth.tar"
    ckpt = load_checkpoint(out)
    state = {k[len("model."):]: v for k, v in ckpt["model"].items()}
    encoder = [k for k in state if not k.startswith("head.")]
    assert len(encoder) == 2 + 2 + 2 * 12 + 2  # cls and pos, patch embed, 2 blocks, norm: all from the MAE
    for k in encoder:
        assert torch.equal(state[k], mae.state_dict()[k]), k
    assert state["head.0.num_batches_tracked"].item() == 2 and state["head.0.running_mean"].abs().sum() > 0
    assert len(ckpt["optimizer"]["state"]) == 2  # momentum buffers for the head's weight and bias only
    capsys.readouterr()
    assert ssl_eval(["-d", "cpu", "-b", "8", "-f", "linprobe", "--ckpt", str(out), "--exp-options",
                     *[f"{k}={v}" for k, v in SMALL.items()]]) == 0  # the probe's head loads strictly
    assert capsys.readouterr().out.strip() == f"Top1: {ckpt['best_top1']:.3f}, Top5: {ckpt['best_top5']:.3f}"
