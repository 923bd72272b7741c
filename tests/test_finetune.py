"""Fine-tuning recipes (fact sheet 4.4-4.6), layer decay, weight loading, evaluation, best tracking."""
from __future__ import annotations

import pytest
import torch
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mae_lite.cli.train import main as ssl_train
from mae_lite.engine.checkpoint import load_checkpoint, save_checkpoint
from mae_lite.engine.dist import DistEnv
from mae_lite.engine.evaluate import ShardSampler, evaluate
from mae_lite.engine.optim import layer_decay_scale, vit_layer_id
from mae_lite.errors import UserError
from mae_lite.recipes import Finetune, FinetuneMAE, FinetuneRPE, resolve_recipe

SMALL = dict(dataset="demo", img_size=32, patch_size=4, depth=2, num_classes=13, demo_samples=32, num_workers=0)


def test_recipe_values_match_the_fact_sheet():
    mae = FinetuneMAE(pretrain_exp_name="p")
    assert (mae.encoder_arch, mae.global_pool, mae.num_classes, mae.drop_path, mae.max_epoch) == \
        ("vit_tiny_patch16", True, 1000, 0.1, 100)
    assert (mae.opt, mae.opt_betas, mae.opt_eps, mae.weight_decay, mae.layer_decay) == ("adamw", (0.9, 0.999), 1e-8, 0.05, 0.85)
    assert mae.basic_lr_per_img * 1024 == pytest.approx(4e-3)
    assert (mae.warmup_epochs, mae.warmup_lr, mae.min_lr) == (5, 0.0, 1e-6)
    assert (mae.aa, mae.reprob, mae.mixup, mae.cutmix, mae.smoothing) == ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)
    assert (mae.train_interpolation, mae.color_jitter, mae.save_folder_prefix) == ("bicubic", 0.4, "ft_mae_")
    impr = Finetune(pretrain_exp_name="p")
    assert (impr.max_epoch, impr.aa, impr.reprob, impr.mixup, impr.cutmix, impr.smoothing, impr.drop_path) == \
        (300, "rand-m10-mstd0.5-inc1", 0.0, 0.2, 0.0, 0.0, 0.0)
    assert (impr.color_jitter, impr.clip_grad, impr.layer_decay, impr.save_folder_prefix) == (0.3, None, 0.85, "ft_")
    rpe = FinetuneRPE(pretrain_exp_name="p")
    assert (rpe.encoder_arch, rpe.save_folder_prefix, rpe.max_epoch) == ("vit_tiny_patch16_rpe", "ft_impr_rpe_", 300)
    for name in ("finetuning_exp.py", "finetuning_mae_exp.py", "finetuning_rpe_exp.py"):
        assert resolve_recipe(name) in (Finetune, FinetuneMAE, FinetuneRPE)


def test_output_folder_and_exp_name_rules():
    r = Finetune(pretrain_exp_name="mae_lite/mae_tiny_400e", output_dir="/o")
    assert str(r.output_path) == "/o/mae_lite/mae_tiny_400e/ft_eval"
    with pytest.raises(UserError, match="pretrain_exp_name"):
        Finetune(exp_name="x")
    with pytest.raises(UserError, match="pretrain_exp_name"):
        Finetune().output_path


def test_small_overrides_apply():
    r = Finetune(pretrain_exp_name="p", layer_decay="0.75", reprob="0.0", smoothing="0.0",
                 encoder_arch="vit_small_patch16", color_jitter="0.3")
    assert (r.layer_decay, r.encoder_arch) == (0.75, "vit_small_patch16")


def test_layer_ids_and_decay_scales_by_hand():
    assert [vit_layer_id(n, 12) for n in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight",
                                          "blocks.11.mlp.fc2.bias", "fc_norm.weight", "head.weight")] == [0, 0, 0, 1, 12, 13, 13]
    scale = layer_decay_scale(12, 0.85, prefix="model.")
    assert scale("model.cls_token") == pytest.approx(0.85**13) == pytest.approx(0.120905, abs=1e-6)
    assert scale("model.blocks.0.attn.qkv.weight") == pytest.approx(0.85**12)
    assert scale("model.blocks.11.attn.qkv.weight") == pytest.approx(0.85)
    assert scale("model.head.weight") == 1.0


def test_optimizer_groups_use_layer_decay_and_no_decay_rules():
    recipe = Finetune(pretrain_exp_name="p", **SMALL)
    method = recipe.build_model()
    opt = recipe.build_optimizer(method)
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    d = 2  # depth: ids 0..3, scale 0.85^(3 - id)
    assert by_name["model.pos_embed"]["lr_scale"] == pytest.approx(0.85**3) and by_name["model.pos_embed"]["weight_decay"] == 0
    assert by_name["model.cls_token"]["weight_decay"] == 0  # no_weight_decay() of the network
    assert by_name["model.blocks.1.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.85 ** (d + 1 - 2))
    assert by_name["model.blocks.1.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["model.head.weight"]["lr_scale"] == 1.0
    sched = recipe.build_schedule(opt, iters_per_epoch=10)  # 100 epochs x 10, 50 warm-up steps
    sched.step(50)
    g = by_name["model.blocks.1.attn.qkv.weight"]
    assert g["lr"] == pytest.approx(recipe.scaled_lr * 0.85)  # end of warm-up: peak x scale
    sched.step(50 + (recipe.max_epoch * 10 - 50) // 2)  # middle of the cosine: halfway between peak and floor
    assert g["lr"] == pytest.approx(0.5 * (recipe.scaled_lr + 1e-6) * 0.85)
    sched.step(recipe.max_epoch * 10)  # end: min_lr scaled by the group, as the original
    assert g["lr"] == pytest.approx(1e-6 * 0.85)


def test_randaugment_mixup_and_loss_handed_to_timm():
    recipe = Finetune(pretrain_exp_name="p", **SMALL)
    tf = recipe.build_datasets()["train"].transform
    ra = [t for t in tf.transforms if isinstance(t, RandAugment)]
    assert len(ra) == 1 and ra[0].num_layers == 2 and all(op.magnitude == 10 for op in ra[0].ops)
    assert all(op.magnitude_std == 0.5 for op in ra[0].ops)
    assert not any(type(t).__name__ in ("ColorJitter", "RandomErasing") for t in tf.transforms)  # jitter off under RA
    method = recipe.build_model()
    assert isinstance(method.mixup, Mixup) and method.mixup.mixup_alpha == 0.2 and method.mixup.cutmix_alpha == 0.0
    assert method.mixup.label_smoothing == 0.0 and isinstance(method.criterion, SoftTargetCrossEntropy)
    mae = FinetuneMAE(pretrain_exp_name="p", **SMALL).build_model()
    assert mae.mixup.cutmix_alpha == 1.0 and mae.mixup.label_smoothing == 0.1
    plain = Finetune(pretrain_exp_name="p", mixup="0", smoothing="0.1", **SMALL).build_model()
    assert plain.mixup is None and isinstance(plain.criterion, LabelSmoothingCrossEntropy)


def test_eval_transform_is_resize_then_center_crop():
    from mae_lite.data.transforms import eval_transform

    t = eval_transform(224, Finetune.crop_pct)
    assert t.transforms[0].size == 256 and t.transforms[1].size == (224, 224)
    assert eval_transform(32, 0.875).transforms[0].size == 36


def test_shard_sampler_counts_each_image_once():
    seen = []
    for rank in range(3):
        seen += list(ShardSampler(10, DistEnv(rank=rank, world_size=3)))
    assert sorted(seen) == list(range(10))


def test_evaluate_against_hand_count():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # class c scores -c, the predicted class (first pixel) +10: class 5 is never in the top 5
            logits = -torch.arange(6.0).repeat(x.shape[0], 1)
            logits[torch.arange(x.shape[0]), x[:, 0, 0, 0].long()] += 10
            return logits

    imgs = torch.zeros(8, 1, 2, 2)
    imgs[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])  # predictions
    target = torch.tensor([0, 1, 2, 3, 3, 5, 4, 0])  # top-1 right 4 times; top-5 misses only the target 5
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(imgs, target), batch_size=3)
    assert evaluate(Fixed(), loader, DistEnv()) == (pytest.approx(50.0), pytest.approx(87.5))


def _pretrain(tmp_path, name="pre"):
    assert ssl_train(["-d", "cpu", "-f", "mae_lite_demo", "-b", "16", "-e", "1", "--exp-options", f"output_dir={tmp_path}",
                      f"exp_name={name}", "depth=2", "demo_samples=32", "num_workers=0", "vis_images=0"]) == 0
    return tmp_path / name / "last_epoch_ckpt.pth.tar"


def _finetune(tmp_path, *extra, pre="pre", epochs="1"):
    opts = [f"{k}={v}" for k, v in SMALL.items()]
    return ssl_train(["-d", "cpu", "-f", "finetuning_exp.py", "-b", "16", "-e", epochs, *extra, "--exp-options",
                      f"output_dir={tmp_path}", f"pretrain_exp_name={pre}", "eval_interval=1", *opts])


def test_finetune_loads_pretraining_run_automatically(tmp_path):
    src = _pretrain(tmp_path)
    assert _finetune(tmp_path) == 0
    out = tmp_path / "pre" / "ft_eval"
    log = next(out.glob("train_log-*.txt")).read_text()
    assert f"initial weights from {src}" in log and "left at init 4 (fc_norm.weight, fc_norm.bias, head.weight, head.bias)" in log
    assert "Top1:" in log
    ft = load_checkpoint(out / "last_epoch_ckpt.pth.tar")
    assert (out / "last_epoch_best_ckpt.pth.tar").is_file() and ft["best_top1_epoch"] == 1
    assert not any("decoder" in k for k in ft["model"])


def test_original_format_checkpoint_with_ckpt(tmp_path):
    src = load_checkpoint(_pretrain(tmp_path))
    released = {"model": {f"module.{k}": v for k, v in src["model"].items()}, "start_epoch": 400}  # 8-GPU keys
    path = tmp_path / "mae_tiny_400e.pth.tar"
    save_checkpoint(released, path)
    assert _finetune(tmp_path, "--ckpt", str(path), pre="mae_lite/released") == 0
    log = next((tmp_path / "mae_lite/released/ft_eval").glob("train_log-*.txt")).read_text()
    assert "no architecture record" in log and "loaded 28 tensors" in log


def test_scratch_trains_with_a_notice(tmp_path):
    assert _finetune(tmp_path, pre="scratch/vit_tiny") == 0
    log = next((tmp_path / "scratch/vit_tiny/ft_eval").glob("train_log-*.txt")).read_text()
    assert "training from random initialisation" in log


def test_refuses_checkpoint_of_another_head_count(tmp_path, capsys):
    src = load_checkpoint(_pretrain(tmp_path))
    src["arch"]["kwargs"]["num_heads"] = 3  # same tensor shapes, different heads: only the record tells
    save_checkpoint(src, tmp_path / "three_heads.pth.tar")
    capsys.readouterr()
    assert _finetune(tmp_path, "--ckpt", str(tmp_path / "three_heads.pth.tar"), pre="x") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_heads 3 vs 12" in err


def test_resume_keeps_best_metric(tmp_path):
    _pretrain(tmp_path)
    assert _finetune(tmp_path, epochs="1") == 0
    first = load_checkpoint(tmp_path / "pre/ft_eval/last_epoch_ckpt.pth.tar")
    assert _finetune(tmp_path, "--resume", epochs="2") == 0
    second = load_checkpoint(tmp_path / "pre/ft_eval/last_epoch_ckpt.pth.tar")
    assert second["start_epoch"] == 2
    assert second["best_top1"] >= first["best_top1"]
    assert second["best_top1_epoch"] in (1, 2)
    if second["best_top1_epoch"] == 1:  # epoch 2 was not better: the old best is kept, not reset
        assert second["best_top1"] == first["best_top1"]


def test_rpe_recipe_builds_rpe_model():
    method = FinetuneRPE(pretrain_exp_name="p", **SMALL).build_model()
    assert type(method.model).__name__ == "VisionTransformerRPE"
    assert any("relative_position_bias_table" in k for k in method.model.state_dict())


def test_two_process_eval_counts_every_image_once(tmp_path, capsys):
    """7 eval images over 2 gloo processes: the top-1 logged by training equals ssl_eval's in one process."""
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from mae_lite.cli.eval import main as ssl_eval

    rng = np.random.default_rng(1)
    for c in range(3):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(3 if c < 2 else 1):  # 7 images: not divisible by 2 processes
            Image.fromarray((rng.random((36, 36, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    opts = [f"output_dir={tmp_path}", "pretrain_exp_name=scratch/ddp", f"dataset=folder:{tmp_path / 'imgs'}", "img_size=32",
            "patch_size=4", "depth=2", "num_classes=3", "num_workers=0", "mixup=0", "aa=none", "lr=0.05"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mae_lite.cli.train", "-d", "cpu:2", "-f", "finetuning", "-b", "4",
                           "-e", "2", "--exp-options", *opts], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "scratch/ddp/ft_eval"
    log = next(out.glob("train_log-*.txt")).read_text()
    top1 = float([line for line in log.splitlines() if "Top1:" in line][-1].split("Top1:")[1].split(",")[0])
    capsys.readouterr()
    assert ssl_eval(["-d", "cpu", "-b", "3", "-f", "finetuning", "--ckpt", str(out / "last_epoch_ckpt.pth.tar"),
                     "--exp-options", *opts[2:]]) == 0
    single = float(capsys.readouterr().out.split("Top1:")[1].split(",")[0])
    assert top1 == pytest.approx(single)
    assert single * 7 / 100 == pytest.approx(round(single * 7 / 100), abs=1e-3)  # a whole number of the 7 images
