"""Engine: parameter groups and optimizers, the warm-up + cosine schedule, checkpoints, devices.

Expected values come from the fact sheet (§2.6, §2.7, §3.6, §4.1) and from hand computation.
"""
from __future__ import annotations

import math
import os

import pytest
import timm
import torch
import torch.nn as nn

import mae_lite  # noqa: F401  (registers the models in timm)
from mae_lite.engine import checkpoint as ckpt_mod
from mae_lite.engine.checkpoint import (LoadReport, checkpoint_path, load_checkpoint, load_pretrained,
                                        network_state, save_checkpoint, strip_prefix)
from mae_lite.engine.dist import parse_devices
from mae_lite.engine.optim import build_optimizer, param_groups
from mae_lite.engine.schedule import WarmupCosine
from mae_lite.errors import UserError
from mae_lite.recipes import MaeLite

SMALL = dict(img_size=32, patch_size=4, depth=2)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg, f"error message spans several lines: {msg!r}"
    return msg


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return timm.create_model("mae_vit_tiny_patch16", **SMALL)


def _vit(num_classes: int = 10):
    return timm.create_model("vit_tiny_patch16", num_classes=num_classes, **SMALL)


def _group_of(groups):
    """id(param) -> list of groups containing it."""
    where: dict[int, list[dict]] = {}
    for g in groups:
        for p in g["params"]:
            where.setdefault(id(p), []).append(g)
    return where


# --------------------------------------------------------------------------------------------------
# param_groups (fact sheet §4.1: no WD for 1-D params and biases; cls/mask tokens decayed; frozen excluded)
# --------------------------------------------------------------------------------------------------
def test_param_groups_weight_decay_rule(mae):
    groups = param_groups(mae, 0.05)
    where = _group_of(groups)
    named = dict(mae.named_parameters())
    expected_no_decay = {"patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
                         "blocks.0.attn.qkv.bias", "blocks.1.mlp.fc2.bias", "norm.weight", "norm.bias",
                         "decoder_embed.bias", "decoder_norm.weight", "decoder_pred.bias"}
    expected_decay = {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                      "blocks.1.mlp.fc1.weight", "decoder_embed.weight", "decoder_blocks.0.attn.proj.weight",
                      "decoder_pred.weight"}
    for name in expected_no_decay:
        assert [g["weight_decay"] for g in where[id(named[name])]] == [0.0], name
    for name in expected_decay:
        assert [g["weight_decay"] for g in where[id(named[name])]] == [0.05], name
    # the general rule, on every parameter
    for name, p in named.items():
        if not p.requires_grad:
            continue
        wd = where[id(p)][0]["weight_decay"]
        if p.ndim <= 1 or name.endswith(".bias"):
            assert wd == 0.0, name
        else:
            assert wd == 0.05, name
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}


def test_param_groups_tokens_are_decayed(mae):
    # the original's behaviour (fact sheet §4.1, §10.9): 3-D cls_token and mask_token get weight decay
    where = _group_of(param_groups(mae, 0.05))
    assert where[id(mae.cls_token)][0]["weight_decay"] == 0.05
    assert where[id(mae.mask_token)][0]["weight_decay"] == 0.05


def test_param_groups_exclude_frozen_pos_embeds(mae):
    assert not mae.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    where = _group_of(param_groups(mae, 0.05))
    assert id(mae.pos_embed) not in where
    assert id(mae.decoder_pos_embed) not in where


def test_param_groups_cover_every_trainable_parameter_once(mae):
    groups = param_groups(mae, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in mae.parameters() if p.requires_grad}
    assert set(ids) == trainable
    # 2 encoder blocks x 12 tensors + decoder block 12 + 18 others - 0 (pos tables are frozen)
    n_params = sum(1 for _ in mae.parameters())
    assert len(ids) == n_params - 2


def test_param_groups_skip_names_move_to_no_decay(mae):
    groups = param_groups(mae, 0.05, skip=["cls_token", "mask_token", "blocks.0.attn.qkv.weight"])
    where = _group_of(groups)
    assert where[id(mae.cls_token)][0]["weight_decay"] == 0.0
    assert where[id(mae.mask_token)][0]["weight_decay"] == 0.0
    assert where[id(mae.blocks[0].attn.qkv.weight)][0]["weight_decay"] == 0.0
    assert where[id(mae.blocks[1].attn.qkv.weight)][0]["weight_decay"] == 0.05  # not named: still decayed


def test_param_groups_lr_scale_values_stored(mae):
    def scale(name: str) -> float:
        if name.startswith("blocks.0."):
            return 0.25
        if name.startswith("blocks.1."):
            return 0.5
        return 1.0

    groups = param_groups(mae, 0.05, lr_scale=scale)
    named = {id(p): n for n, p in mae.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert g["lr_scale"] == scale(named[id(p)]), named[id(p)]
    assert {g["lr_scale"] for g in groups} == {0.25, 0.5, 1.0}
    # decay and no-decay stay separate within each scale
    assert sorted((g["lr_scale"], g["weight_decay"]) for g in groups) == [
        (0.25, 0.0), (0.25, 0.05), (0.5, 0.0), (0.5, 0.05), (1.0, 0.0), (1.0, 0.05)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))


def test_param_groups_without_scale_fn_have_scale_one(mae):
    assert {g["lr_scale"] for g in param_groups(mae, 0.05)} == {1.0}


# --------------------------------------------------------------------------------------------------
# build_optimizer
# --------------------------------------------------------------------------------------------------
def test_build_optimizer_adamw_with_recipe_betas_and_eps(mae):
    r = MaeLite(batch_size=1024)
    opt = build_optimizer(param_groups(mae, r.weight_decay), r)
    assert type(opt) is torch.optim.AdamW
    for g in opt.param_groups:
        assert tuple(g["betas"]) == (0.9, 0.95)
        assert g["eps"] == 1e-8
        assert g["lr"] == pytest.approx(6e-4, rel=1e-9)
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.05]
    # the recipe's values are passed through, not the library defaults
    r2 = MaeLite(opt_eps="1e-6", opt_betas="(0.8,0.9)", lr="1e-3")
    opt2 = build_optimizer(param_groups(mae, r2.weight_decay), r2)
    assert all(g["eps"] == 1e-6 and tuple(g["betas"]) == (0.8, 0.9) for g in opt2.param_groups)
    assert all(g["lr"] == pytest.approx(1e-3) for g in opt2.param_groups)


def test_recipe_build_optimizer_on_the_method_module():
    r = MaeLite(img_size=32, patch_size=4, depth=2)
    model = r.build_model()
    opt = r.build_optimizer(model)
    assert type(opt) is torch.optim.AdamW
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in opt.param_groups)
    where = _group_of(opt.param_groups)
    assert where[id(model.model.cls_token)][0]["weight_decay"] == 0.05
    assert where[id(model.model.blocks[0].attn.qkv.bias)][0]["weight_decay"] == 0.0
    assert id(model.model.pos_embed) not in where


def test_build_optimizer_sgd_nesterov(mae):
    r = MaeLite(opt="sgd", lr="0.1", momentum="0.8", weight_decay="0")
    opt = build_optimizer(param_groups(mae, r.weight_decay), r)
    assert type(opt) is torch.optim.SGD
    for g in opt.param_groups:
        assert g["nesterov"] is True
        assert g["momentum"] == 0.8
        assert g["lr"] == pytest.approx(0.1)
        assert g["weight_decay"] == 0.0


# --------------------------------------------------------------------------------------------------
# WarmupCosine (fact sheet §2.7: linear warm-up from warmup_lr to lr, then cosine to min_lr)
# --------------------------------------------------------------------------------------------------
def _opt(scales=(1.0,)):
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr_scale": s} for s in scales]
    return torch.optim.SGD(groups, lr=123.0)


# lr 1.0, 100 steps, 10 warm-up steps from 0.1, floor 0.01
LR, TOTAL, WARM, WLR, MIN = 1.0, 100, 10, 0.1, 0.01


def _sched(scales=(1.0,), **kw):
    opt = _opt(scales)
    args = dict(total_steps=TOTAL, warmup_steps=WARM, warmup_lr=WLR, min_lr=MIN)
    args.update(kw)
    return opt, WarmupCosine(opt, LR, **args)


@pytest.mark.parametrize("step,expected", [
    (0, 0.1),  # = warmup_lr
    (1, 0.19),  # 0.1 + 0.9 * 1/10
    (5, 0.55),  # 0.1 + 0.9 * 5/10, mid warm-up
    (9, 0.91),
    (10, 1.0),  # end of warm-up = lr
    (55, 0.505),  # middle of the cosine part: (lr + min_lr) / 2
    (100, 0.01),  # the end: min_lr
])
def test_warmup_cosine_hand_values(step, expected):
    opt, s = _sched()
    s.step(step)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_warmup_cosine_last_iteration_and_quarter_points():
    opt, s = _sched()
    # last iteration t = 99: (t - W)/(T - W) = 89/90, q = (1 + cos(89 pi/90))/2 = sin^2(pi/180)
    s.step(99)
    q = math.sin(math.pi / 180) ** 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 + 0.99 * q, rel=1e-9)
    assert 0.01 < opt.param_groups[0]["lr"] < 0.0104
    # a quarter of the way into the cosine: t = 10 + 22.5 is not an integer, use 90 steps split at 1/3:
    # t = 40: (30/90) -> q = (1 + cos(pi/3))/2 = 0.75 -> 0.75 * 1.0 + 0.25 * 0.01
    s.step(40)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.7525, rel=1e-9)
    # t = 70: (60/90) -> q = (1 + cos(2 pi/3))/2 = 0.25 -> 0.25 + 0.75 * 0.01
    s.step(70)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2575, rel=1e-9)


def test_warmup_cosine_is_monotone_and_stays_at_floor_after_end():
    opt, s = _sched()
    values = []
    for t in range(0, TOTAL + 5):
        s.step(t)
        values.append(opt.param_groups[0]["lr"])
    assert all(a < b for a, b in zip(values[:WARM], values[1:WARM + 1]))  # rising through the warm-up
    assert all(a >= b for a, b in zip(values[WARM:], values[WARM + 1:]))  # then never rising
    assert max(values) == pytest.approx(LR)
    assert values[-1] == pytest.approx(MIN)


def test_warmup_cosine_zero_floor_and_no_warmup():
    opt = _opt()
    s = WarmupCosine(opt, 2.4e-3, total_steps=20, warmup_steps=0)  # warmup_lr and min_lr default to 0
    s.step(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.4e-3)
    s.step(10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.2e-3)
    s.step(20)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


def test_step_writes_value_times_group_lr_scale():
    opt, s = _sched(scales=(1.0, 0.5, 0.1))
    s.step(5)  # 0.55 unscaled
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.55, 0.275, 0.055], rel=1e-9)
    s.step(55)  # 0.505 unscaled; floor scaled with the group by default (the original's warmcos_scale)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.505, 0.2525, 0.0505], rel=1e-9)
    s.step(100)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.005, 0.001], rel=1e-9)
    assert s.lrs() == pytest.approx([0.01, 0.005, 0.001], rel=1e-9)


def test_group_without_lr_scale_counts_as_one():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=9.0)
    s = WarmupCosine(opt, LR, total_steps=TOTAL, warmup_steps=WARM, warmup_lr=WLR, min_lr=MIN)
    s.step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55)


def test_scale_min_lr_false_keeps_floor_unscaled():
    opt, s = _sched(scales=(1.0, 0.5), scale_min_lr=False)
    s.step(100)  # end of the run: exactly the floor, not scaled
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01], rel=1e-9)
    s.step(55)  # q = 0.5: 0.5 * scale * lr + 0.5 * min_lr
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.505, 0.255], rel=1e-9)
    s.step(10)  # q = 1: scale * lr
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.5], rel=1e-9)


def test_state_dict_round_trip():
    _, s = _sched()
    s.step(37)
    assert s.state_dict() == {"last_count": 37}
    _, s2 = _sched()
    assert s2.state_dict() == {"last_count": 0}
    s2.load_state_dict({"last_count": 37})
    assert s2.last_count == 37
    assert s2.state_dict() == {"last_count": 37}


def test_warmup_longer_than_run_only_ramps():
    opt = _opt()
    s = WarmupCosine(opt, 1.0, total_steps=10, warmup_steps=40, warmup_lr=0.0, min_lr=0.0)
    values = []
    for t in range(10):
        s.step(t)
        values.append(opt.param_groups[0]["lr"])
    assert values == pytest.approx([t / 40 for t in range(10)], rel=1e-9, abs=1e-15)


def test_recipe_schedule_uses_epochs_times_iterations():
    r = MaeLite(batch_size=1024, max_epoch=10, warmup_epochs=2)  # lr 6e-4
    opt = _opt()
    s = r.build_schedule(opt, iters_per_epoch=5)  # 50 steps, 10 of warm-up, from 0, to 0
    expected = {0: 0.0, 5: 3e-4, 10: 6e-4, 30: 3e-4, 50: 0.0}
    for t, v in expected.items():
        s.step(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(v, rel=1e-9, abs=1e-15), t


# --------------------------------------------------------------------------------------------------
# checkpoints: atomic save, safe load
# --------------------------------------------------------------------------------------------------
def _state(v: float) -> dict:
    return {"start_epoch": 3, "model": {"model.w": torch.full((4, 4), v), "model.b": torch.arange(4.0)},
            "optimizer": {}, "scheduler": {"last_count": 30}, "best_top1": 0.0}


def test_save_then_load_round_trip(tmp_path):
    path = tmp_path / "sub" / "last_epoch_ckpt.pth.tar"
    save_checkpoint(_state(1.5), path)  # creates the folder
    back = load_checkpoint(path)
    assert back["start_epoch"] == 3 and back["scheduler"] == {"last_count": 30}
    assert torch.equal(back["model"]["model.w"], torch.full((4, 4), 1.5))
    assert os.listdir(path.parent) == ["last_epoch_ckpt.pth.tar"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_save_is_atomic_when_the_write_crashes(tmp_path, monkeypatch, exc):
    path = tmp_path / "last_epoch_ckpt.pth.tar"
    save_checkpoint(_state(1.0), path)
    first_bytes = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint" * 100)
        f.flush()
        raise exc

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(type(exc)):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["last_epoch_ckpt.pth.tar"]  # no temp file left behind
    assert path.read_bytes() == first_bytes
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["model.w"], torch.full((4, 4), 1.0))


def test_training_state_round_trips_through_safe_load(tmp_path):
    # what a training run stores: wrapper weights, AdamW moments, schedule, recipe config and architecture
    import random

    r = MaeLite(img_size=32, patch_size=4, depth=2, batch_size=8)
    method = r.build_model()
    opt = r.build_optimizer(method)
    sched = r.build_schedule(opt, iters_per_epoch=2)
    sched.step(0)
    loss, _ = method(torch.randn(2, 3, 32, 32))
    loss.backward()
    opt.step()
    sched.step(1)
    state = {"rng": [{"torch": torch.get_rng_state(), "python": random.getstate()}], "start_epoch": 1,
             "model": method.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": {}, "best_top1": 0.0, "best_top5": 0.0, "best_top1_epoch": -1,
             "arch": r.arch_record(), "recipe": r.name, "config": r.to_dict()}
    path = tmp_path / "last_epoch_ckpt.pth.tar"
    save_checkpoint(state, path)
    back = load_checkpoint(path)  # weights_only: no arbitrary code
    assert back["scheduler"] == {"last_count": 1}
    assert back["config"]["opt_betas"] == (0.9, 0.95) and back["config"]["lr"] is None
    assert back["recipe"] == "mae_lite"
    assert set(back["model"]) == set(method.state_dict())
    assert all(k.startswith("model.") for k in back["model"])  # the wrapper's prefix (fact sheet §2.6)
    opt2 = r.build_optimizer(r.build_model())
    opt2.load_state_dict(back["optimizer"])
    assert len(opt2.state) == len(opt.state) > 0


def test_second_save_replaces_the_first(tmp_path):
    path = tmp_path / "ck.pth.tar"
    save_checkpoint(_state(1.0), path)
    save_checkpoint(_state(2.0), path)
    assert torch.equal(load_checkpoint(path)["model"]["model.w"], torch.full((4, 4), 2.0))
    assert os.listdir(tmp_path) == ["ck.pth.tar"]


def test_load_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pth.tar"
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in _one_line(e)


def test_load_truncated_checkpoint(tmp_path):
    good = tmp_path / "good.pth.tar"
    save_checkpoint(_state(1.0), good)
    data = good.read_bytes()
    bad = tmp_path / "torn.pth.tar"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_checkpoint(bad)
    assert str(bad) in _one_line(e)


def test_load_text_file(tmp_path):
    path = tmp_path / "notes.pth.tar"
    path.write_text("this is not a checkpoint\nsecond line\n")
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in _one_line(e)


def test_load_non_dict_checkpoint(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in _one_line(e)


class _Custom:
    pass


def test_load_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "code.pth"
    torch.save({"model": {}, "thing": _Custom()}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in _one_line(e)


# --------------------------------------------------------------------------------------------------
# key prefixes (fact sheet §2.6, §3.6)
# --------------------------------------------------------------------------------------------------
def _t(v: float = 0.0):
    return torch.full((2,), v)


def test_strip_prefix_released_multi_gpu_format():
    state = {"module.model.cls_token": _t(1), "module.model.blocks.0.attn.qkv.weight": _t(2),
             "module.model.decoder_embed.weight": _t(3)}
    out = strip_prefix(state, "model")
    assert set(out) == {"cls_token", "blocks.0.attn.qkv.weight", "decoder_embed.weight"}
    assert torch.equal(out["blocks.0.attn.qkv.weight"], _t(2))


def test_strip_prefix_single_gpu_format_and_trailing_dot():
    state = {"model.cls_token": _t(), "model.norm.weight": _t()}
    assert set(strip_prefix(state, "model")) == {"cls_token", "norm.weight"}
    assert set(strip_prefix(state, "model.")) == {"cls_token", "norm.weight"}


def test_strip_prefix_only_keeps_keys_under_the_prefix():
    # distillation checkpoints also hold the teacher and the adapter (fact sheet §2.6, §4.2)
    state = {"module.model.cls_token": _t(), "module.model.norm.bias": _t(),
             "module.tch_model.cls_token": _t(), "module.attn_adapter.adapter11.weight": _t()}
    assert set(strip_prefix(state, "model")) == {"cls_token", "norm.bias"}


def test_strip_prefix_flat_official_mae_keys():
    state = {"cls_token": _t(), "pos_embed": _t(), "blocks.0.norm1.weight": _t(), "decoder_pred.bias": _t()}
    assert strip_prefix(state, "") == state
    assert set(strip_prefix({"module." + k: v for k, v in state.items()}, "")) == set(state)


def test_strip_prefix_moco_base_encoder():
    state = {"module.base_encoder.cls_token": _t(), "module.base_encoder.blocks.0.mlp.fc1.weight": _t(),
             "module.momentum_encoder.cls_token": _t(), "module.predictor.0.weight": _t()}
    assert set(strip_prefix(state, "base_encoder")) == {"cls_token", "blocks.0.mlp.fc1.weight"}


def test_strip_prefix_does_not_strip_module_unless_all_keys_have_it():
    state = {"module.model.a": _t(), "model.b": _t()}
    assert set(strip_prefix(state, "model")) == {"b"}


def test_network_state_finds_the_model_dict():
    ours = {"start_epoch": 1, "model": {"model.cls_token": _t(), "model.head.weight": _t()}, "optimizer": {}}
    assert set(network_state(ours)) == {"cls_token", "head.weight"}
    released = {"model": {"module.model.cls_token": _t()}}
    assert set(network_state(released, "model")) == {"cls_token"}
    official = {"model": {"cls_token": _t(), "mask_token": _t()}}
    assert set(network_state(official, "")) == {"cls_token", "mask_token"}
    moco = {"model": {"module.base_encoder.cls_token": _t(), "module.momentum_encoder.cls_token": _t()}}
    assert set(network_state(moco, "base_encoder")) == {"cls_token"}


def test_network_state_wrong_prefix_suggests_weights_prefix():
    official = {"model": {"cls_token": _t(), "pos_embed": _t()}}
    with pytest.raises(UserError) as e:
        network_state(official, "model")
    msg = _one_line(e)
    assert "weights_prefix" in msg
    moco = {"model": {"module.base_encoder.cls_token": _t()}}
    with pytest.raises(UserError) as e:
        network_state(moco, "model")
    assert "weights_prefix" in _one_line(e)


def test_network_state_without_tensor_dict():
    with pytest.raises(UserError) as e:
        network_state({"model": {"a": "not a tensor"}})
    _one_line(e)


# --------------------------------------------------------------------------------------------------
# load_pretrained: an MAE pre-training checkpoint into a classification ViT (fact sheet §3.6)
# --------------------------------------------------------------------------------------------------
ENCODER_KEYS = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"] + [
    f"blocks.{i}.{part}.{wb}" for i in range(2)
    for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for wb in ("weight", "bias")]
DECODER_KEYS = ["mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"] + [
    f"decoder_blocks.0.{part}.{wb}"
    for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for wb in ("weight", "bias")]
HEAD_KEYS = ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("layout", ["released", "single", "official"])
def test_load_pretrained_mae_into_vit(tmp_path, mae, layout):
    sd = mae.state_dict()
    assert set(sd) == set(ENCODER_KEYS) | set(DECODER_KEYS) | {"norm.weight", "norm.bias"}  # the keys we expect
    if layout == "released":  # 8-GPU run of the original: module.model.*
        ckpt, prefix = {"start_epoch": 400, "model": {"module.model." + k: v for k, v in sd.items()}}, "model"
    elif layout == "single":
        ckpt, prefix = {"model": {"model." + k: v for k, v in sd.items()}}, "model"
    else:  # official MAE release: flat keys under "model"
        ckpt, prefix = {"model": dict(sd)}, ""
    path = tmp_path / "mae_tiny.pth.tar"
    torch.save(ckpt, path)

    torch.manual_seed(1)
    vit = _vit()
    report = load_pretrained(vit, str(path), prefix=prefix)
    assert isinstance(report, LoadReport)
    assert sorted(report.loaded) == sorted(ENCODER_KEYS)
    # the decoder, mask_token and MAE's final norm (absent under global pooling) are not used
    assert sorted(report.skipped) == sorted(DECODER_KEYS + ["norm.weight", "norm.bias"])
    assert sorted(report.missing) == sorted(HEAD_KEYS)
    assert report.resized == []

    # weights copied, fixed sin-cos table copied into the learnable pos_embed
    assert torch.equal(vit.pos_embed, mae.pos_embed)
    assert torch.equal(vit.cls_token, mae.cls_token)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    assert torch.equal(vit.patch_embed.proj.weight, mae.patch_embed.proj.weight)
    # fc_norm and head left at initialisation: LayerNorm 1/0, zero head
    assert torch.equal(vit.fc_norm.weight, torch.ones(192)) and torch.equal(vit.fc_norm.bias, torch.zeros(192))
    assert torch.equal(vit.head.weight, torch.zeros(10, 192)) and torch.equal(vit.head.bias, torch.zeros(10))

    summary = report.summary
    assert "\n" not in summary
    assert "28" in summary and "22" in summary and "4" in summary


def test_load_pretrained_from_dict_and_drop(mae):
    vit = _vit()
    report = load_pretrained(vit, {"model": {"model." + k: v for k, v in mae.state_dict().items()}},
                             drop=["blocks.1."])
    blocks1 = {k for k in ENCODER_KEYS if k.startswith("blocks.1.")}
    assert set(report.loaded) == set(ENCODER_KEYS) - blocks1
    assert blocks1 <= set(report.skipped)
    assert blocks1 <= set(report.missing)


def test_load_pretrained_skips_shape_mismatch():
    src = _vit(num_classes=1000)
    with torch.no_grad():
        src.head.weight.fill_(3.0)
    dst = _vit(num_classes=10)
    report = load_pretrained(dst, {"model": {"model." + k: v for k, v in src.state_dict().items()}})
    assert {"head.weight", "head.bias"} <= set(report.skipped)
    assert {"head.weight", "head.bias"} <= set(report.missing)
    assert "fc_norm.weight" in report.loaded
    assert torch.equal(dst.head.weight, torch.zeros(10, 192))


def test_load_pretrained_resizes_learned_pos_embed(mae):
    # MAE at 32 px / patch 4 (8x8 grid) into a ViT at 48 px / patch 4 (12x12 grid)
    vit = timm.create_model("vit_tiny_patch16", num_classes=10, img_size=48, patch_size=4, depth=2)
    report = load_pretrained(vit, {"model": {"model." + k: v for k, v in mae.state_dict().items()}})
    assert "pos_embed" in report.loaded
    assert len(report.resized) == 1 and "pos_embed" in report.resized[0]
    assert "resized" in report.summary and "\n" not in report.summary
    assert vit.pos_embed.shape == (1, 1 + 12 * 12, 192)
    assert torch.equal(vit.pos_embed[0, 0], mae.pos_embed[0, 0])  # the cls entry is kept as it is
    assert torch.equal(vit.patch_embed.proj.weight, mae.patch_embed.proj.weight)


def test_load_pretrained_wrong_prefix(tmp_path, mae):
    path = tmp_path / "official.pth"
    torch.save({"model": mae.state_dict()}, path)
    with pytest.raises(UserError) as e:
        load_pretrained(_vit(), str(path), prefix="model")
    assert "weights_prefix" in _one_line(e)


# --------------------------------------------------------------------------------------------------
# --resume path (fact sheet §2.1)
# --------------------------------------------------------------------------------------------------
def test_checkpoint_path_resume_alone(tmp_path):
    out = tmp_path / "outputs" / "mae_lite"
    assert checkpoint_path(out, None) == out / "last_epoch_ckpt.pth.tar"
    assert checkpoint_path(out, "") == out / "last_epoch_ckpt.pth.tar"


def test_checkpoint_path_existing_file(tmp_path, monkeypatch):
    out = tmp_path / "outputs" / "mae_lite"
    f = tmp_path / "elsewhere" / "mine.pth.tar"
    f.parent.mkdir()
    f.write_bytes(b"x")
    assert checkpoint_path(out, str(f)) == f
    monkeypatch.chdir(tmp_path)  # a relative path to an existing file is that file, not <out>/<path>
    assert checkpoint_path(out, "elsewhere/mine.pth.tar") == f.relative_to(tmp_path)


def test_checkpoint_path_name_in_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "outputs" / "mae_lite"
    assert checkpoint_path(out, "last_epoch_best_ckpt.pth.tar") == out / "last_epoch_best_ckpt.pth.tar"


# --------------------------------------------------------------------------------------------------
# -d / --devices
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,kind,ids", [
    ("0-7", "cuda", (0, 1, 2, 3, 4, 5, 6, 7)),
    ("0,1", "cuda", (0, 1)),
    ("3", "cuda", (3,)),
    ("2-4", "cuda", (2, 3, 4)),
    ("0-1,4", "cuda", (0, 1, 4)),
    ("cpu", "cpu", (0,)),
    ("cpu:2", "cpu", (0, 1)),
])
def test_parse_devices(spec, kind, ids):
    d = parse_devices(spec)
    assert d.kind == kind
    assert tuple(d.ids) == ids
    assert d.nprocs == len(ids)


@pytest.mark.parametrize("spec", ["7-0", "a", "cpu:0", "0,0", "0-3,2", "", "cpu:x", "gpu", "-1", "1,7-5", "0-"])
def test_parse_devices_refuses_bad_values(spec):
    with pytest.raises(UserError) as e:
        parse_devices(spec)
    _one_line(e)
