"""Recipes: the MAE-Lite hyper-parameters (fact sheet 4.1), recipe lookup, typed --exp-options, validation.

Expected values are written out by hand from the fact sheet (§2.3, §2.4, §4.1), never recomputed
through the package's own code paths.
"""
from __future__ import annotations

import re
import textwrap

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mae_lite.cli.common import build_recipe
from mae_lite.errors import UserError
from mae_lite.recipes import MaeLite, Recipe, resolve_recipe
from mae_lite.recipes.options import parse_pairs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg, f"error message spans several lines: {msg!r}"
    return msg


# --------------------------------------------------------------------------------------------------
# fact sheet §4.1: the MAE-Lite pre-training recipe
# --------------------------------------------------------------------------------------------------
def test_mae_lite_model_and_epoch_values():
    r = MaeLite()
    assert r.encoder_arch == "mae_vit_tiny_patch16"
    assert r.norm_pix_loss is True
    assert r.mask_ratio == 0.75
    assert r.img_size == 224
    assert r.max_epoch == 400
    assert r.batch_size == 4096  # the documented total batch (8 GPUs x 512)


def test_mae_lite_optimizer_values():
    r = MaeLite()
    assert r.opt.lower() == "adamw"
    assert tuple(r.opt_betas) == (0.9, 0.95)
    assert r.opt_eps == 1e-8
    assert r.weight_decay == 0.05
    assert r.clip_grad is None


def test_mae_lite_lr_scaling_rule():
    r = MaeLite()
    assert r.lr is None  # not given: the linear scaling rule applies
    assert r.basic_lr_per_img == pytest.approx(1.5e-4 / 256, rel=1e-12)
    assert r.scaled_lr == pytest.approx(2.4e-3, rel=1e-9)  # 1.5e-4 * 4096 / 256
    assert MaeLite(batch_size=1024).scaled_lr == pytest.approx(6e-4, rel=1e-9)  # 1.5e-4 * 1024 / 256
    assert MaeLite(batch_size=256).scaled_lr == pytest.approx(1.5e-4, rel=1e-9)


def test_explicit_lr_bypasses_scaling():
    r = MaeLite(lr="1e-3")
    assert r.scaled_lr == pytest.approx(1e-3, rel=1e-12)
    r.update({"batch_size": "1024"})
    assert r.scaled_lr == pytest.approx(1e-3, rel=1e-12)  # still the given value, not rescaled
    r.update({"lr": "none"})
    assert r.scaled_lr == pytest.approx(6e-4, rel=1e-9)  # back to the rule at 1024


def test_mae_lite_schedule_values():
    r = MaeLite()
    assert r.warmup_epochs == 40
    assert r.warmup_lr == 0.0
    assert r.min_lr == 0.0


def test_mae_lite_augmentation_and_misc_values():
    r = MaeLite()
    assert tuple(r.scale) == (0.08, 1.0)
    assert tuple(r.ratio) == pytest.approx((0.75, 4 / 3), rel=1e-12)
    assert r.interpolation == "random"
    assert r.hflip == 0.5
    assert r.seed == 0
    assert r.weights_prefix == "model"
    assert tuple(r.mean) == IMAGENET_MEAN
    assert tuple(r.std) == IMAGENET_STD
    assert r.print_interval == 10
    assert r.dump_interval == 10
    assert r.num_workers == 10
    assert r.enable_tensorboard is True


def test_mae_lite_recipe_validates_at_defaults():
    MaeLite().validate()  # the shipped values are accepted as they are


# --------------------------------------------------------------------------------------------------
# the train transform (fact sheet §4.1: RRC + flip only, ImageNet mean/std)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_train_transform():
    r = MaeLite(dataset="demo", img_size=32, patch_size=4, demo_samples=8)
    sets = r.build_datasets()
    assert sets["eval"] is None  # pre-training has no eval loader
    assert len(sets["train"]) == 8
    return sets["train"].transform


def test_train_transform_is_rrc_flip_only_uint8(demo_train_transform):
    from mae_lite.data.decode import FastRandomResizedCrop

    # one step: RandomResizedCrop + flip, uint8 out (normalised on the device by device_batch), nothing else
    assert type(demo_train_transform) is FastRandomResizedCrop
    assert demo_train_transform.output == "uint8"


def test_train_transform_crop_parameters(demo_train_transform):
    rrc = demo_train_transform
    assert rrc.size == 32
    assert tuple(rrc.scale) == (0.08, 1.0)
    assert tuple(rrc.ratio) == pytest.approx((0.75, 4 / 3), rel=1e-12)
    assert rrc.interpolation == "random"  # a random choice of bilinear / bicubic per image
    assert {rrc.params(80, 60)[5] for _ in range(200)} == {"bilinear", "bicubic"}
    assert rrc.hflip == 0.5


def test_train_transform_normalises_with_imagenet_stats(demo_train_transform):
    r = MaeLite(dataset="demo", img_size=32, patch_size=4, demo_samples=8)
    assert tuple(r.mean) == pytest.approx(IMAGENET_MEAN) and tuple(r.std) == pytest.approx(IMAGENET_STD)
    # A flat colour stays flat through crop/flip; no colour change may happen before normalisation.
    rgb = (128, 64, 200)
    img = Image.new("RGB", (80, 60), rgb)
    batch = torch.stack([demo_train_transform(img) for _ in range(5)])
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.uint8
    out, _ = r.device_batch((batch, torch.zeros(5, dtype=torch.long)), torch.device("cpu"))
    assert out.dtype == torch.float32
    for c in range(3):
        assert bool((batch[:, c] == rgb[c]).all())
        expected = (rgb[c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[:, c], torch.full((5, 32, 32), expected), atol=1e-5), (c, out[:, c].mean(), expected)


# --------------------------------------------------------------------------------------------------
# resolve_recipe
# --------------------------------------------------------------------------------------------------
def test_resolve_builtin_name_and_seed_file_name():
    assert resolve_recipe("mae_lite") is MaeLite
    assert resolve_recipe("mae_lite_exp.py") is MaeLite


def test_builtin_name_wins_over_same_named_file_in_cwd(tmp_path, monkeypatch):
    (tmp_path / "mae_lite_exp.py").write_text(textwrap.dedent("""
        from mae_lite.recipes import MaeLite

        class Exp(MaeLite):
            max_epoch = 3
    """))
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("mae_lite_exp.py") is MaeLite
    forced = resolve_recipe("./mae_lite_exp.py")
    assert forced is not MaeLite and issubclass(forced, MaeLite)
    assert forced().max_epoch == 3


def test_resolve_user_file_with_overridden_defaults(tmp_path):
    path = tmp_path / "my_exp.py"
    path.write_text(textwrap.dedent("""
        from typing import ClassVar
        from mae_lite.recipes import MaeLite

        class Exp(MaeLite):
            name: ClassVar[str] = "my_exp"
            max_epoch: int = 7
            mask_ratio = 0.6          # no annotation: the type comes from MaeLite
            scale = [0.2, 1]          # a list of mixed numbers: converted to the declared tuple of floats
            my_extra: int = 5         # a new option of the user's own
    """))
    exp = resolve_recipe(str(path))
    assert issubclass(exp, MaeLite)
    r = exp()
    assert r.max_epoch == 7
    assert r.mask_ratio == 0.6
    assert r.scale == (0.2, 1.0) and type(r.scale) is tuple and all(type(v) is float for v in r.scale)
    assert r.my_extra == 5
    # inherited values untouched
    assert tuple(r.opt_betas) == (0.9, 0.95)
    assert r.warmup_epochs == 40
    # the user's options are typed like the built-in ones
    r.update({"my_extra": "9", "max_epoch": "11"})
    assert r.my_extra == 9 and r.max_epoch == 11
    with pytest.raises(UserError) as e:
        r.update({"my_extra": "nine"})
    assert "my_extra" in _one_line(e)
    # the built-in recipe is not affected by the user's subclass
    assert MaeLite().max_epoch == 400 and MaeLite().mask_ratio == 0.75


def test_resolve_file_without_exp_is_refused(tmp_path):
    path = tmp_path / "no_exp.py"
    path.write_text("from mae_lite.recipes import MaeLite\n\nclass Recipe2(MaeLite):\n    pass\n")
    with pytest.raises(UserError) as e:
        resolve_recipe(str(path))
    msg = _one_line(e)
    assert "Exp" in msg and "no_exp.py" in msg


def test_resolve_file_whose_exp_is_not_a_recipe_is_refused(tmp_path):
    path = tmp_path / "bad_exp.py"
    path.write_text("class Exp:\n    max_epoch = 3\n")
    with pytest.raises(UserError) as e:
        resolve_recipe(str(path))
    assert "Exp" in _one_line(e)


def test_resolve_unknown_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        resolve_recipe("mae_lyte")
    msg = _one_line(e)
    assert "mae_lyte" in msg
    assert "mae_lite" in msg  # lists the names that do exist


# --------------------------------------------------------------------------------------------------
# --exp-options: parse_pairs and typed conversion (fact sheet §2.4, made typed)
# --------------------------------------------------------------------------------------------------
def test_parse_pairs_splits_at_first_equals():
    assert parse_pairs(["exp_name=run1", "scale=(0.2,1.0)", "lr=1e-3", "x=a=b"]) == {
        "exp_name": "run1", "scale": "(0.2,1.0)", "lr": "1e-3", "x": "a=b"}
    assert parse_pairs(None) == {}
    assert parse_pairs([]) == {}


def test_parse_pairs_refuses_token_without_equals():
    with pytest.raises(UserError) as e:
        parse_pairs(["lr=1e-3", "max_epoch"])
    assert "max_epoch" in _one_line(e)


def test_int_and_float_conversion():
    r = MaeLite(**parse_pairs(["max_epoch=10", "mask_ratio=0.6", "warmup_lr=1e-6", "lr=1e-3", "weight_decay=0"]))
    assert r.max_epoch == 10 and type(r.max_epoch) is int
    assert r.mask_ratio == 0.6 and type(r.mask_ratio) is float
    assert r.warmup_lr == 1e-6 and type(r.warmup_lr) is float
    assert r.lr == 1e-3 and type(r.lr) is float
    assert r.weight_decay == 0.0 and type(r.weight_decay) is float  # "0" given to a float field


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("false", False), ("True", True), ("FALSE", False), ("tRuE", True), ("1", True), ("0", False),
])
def test_bool_conversion(text, expected):
    start = not expected
    r = MaeLite(norm_pix_loss=start)
    r.update({"norm_pix_loss": text})
    assert r.norm_pix_loss is expected


def test_str_conversion():
    r = MaeLite(**parse_pairs(["exp_name=mae_lite/mae_tiny_400e", "interpolation=bicubic"]))
    assert r.exp_name == "mae_lite/mae_tiny_400e"
    assert r.interpolation == "bicubic"


@pytest.mark.parametrize("text", ["none", "None", "NONE"])
def test_optional_none_conversion(text):
    r = MaeLite(clip_grad="1.0", seed="3")
    assert r.clip_grad == 1.0 and r.seed == 3
    r.update({"clip_grad": text, "seed": text, "lr": text})
    assert r.clip_grad is None and r.seed is None and r.lr is None


def test_optional_value_gets_inner_type():
    r = MaeLite(clip_grad="3", seed="5")
    assert r.clip_grad == 3.0 and type(r.clip_grad) is float
    assert r.seed == 5 and type(r.seed) is int


@pytest.mark.parametrize("text", ["(0.2,1.0)", "0.2,1.0", "(0.2, 1.0)", "[0.2,1.0]"])
def test_tuple_conversion(text):
    r = MaeLite(scale=text)
    assert r.scale == (0.2, 1.0)
    assert type(r.scale) is tuple and all(type(v) is float for v in r.scale)


def test_tuple_of_ints_text_becomes_floats():
    r = MaeLite(opt_betas="(1,1)")
    assert r.opt_betas == (1.0, 1.0) and all(type(v) is float for v in r.opt_betas)


@pytest.mark.parametrize("key,text", [
    ("max_epoch", "ten"),
    ("max_epoch", "2.5"),
    ("mask_ratio", "abc"),
    ("norm_pix_loss", "maybe"),
    ("scale", "(0.5)"),
    ("scale", "0.5"),
    ("scale", "(0.1,0.5,1.0)"),
    ("scale", "(a,b)"),
    ("seed", "x"),
    ("lr", "fast"),
])
def test_wrong_type_is_one_line_user_error_naming_the_key(key, text):
    with pytest.raises(UserError) as e:
        MaeLite(**{key: text})
    assert key in _one_line(e)


def test_python_values_of_wrong_type_are_refused():
    r = MaeLite()
    with pytest.raises(UserError) as e:
        r.update({"max_epoch": True})
    assert "max_epoch" in _one_line(e)
    with pytest.raises(UserError) as e:
        r.update({"max_epoch": 2.5})
    assert "max_epoch" in _one_line(e)
    assert r.max_epoch == 400


def test_refused_validation_changes_nothing():
    r = MaeLite()
    with pytest.raises(UserError):
        r.update({"max_epoch": "10", "mask_ratio": "1.0"})
    assert r.max_epoch == 400 and r.mask_ratio == 0.75


def test_broken_user_recipe_file_is_one_line(tmp_path):
    bad = tmp_path / "broken_exp.py"
    bad.write_text("from mae_lite.recipes import MaeLite\nclass Exp(MaeLite)\n    max_epoch = 3\n")
    with pytest.raises(UserError) as e:
        resolve_recipe(str(bad))
    assert "broken_exp.py" in _one_line(e) and "line 2" in _one_line(e)


def test_failed_conversion_changes_nothing():
    r = MaeLite()
    with pytest.raises(UserError):
        r.update({"max_epoch": "10", "mask_ratio": "abc"})
    assert r.max_epoch == 400 and r.mask_ratio == 0.75


@pytest.mark.parametrize("key,closest", [("lrr", "lr"), ("mask_ration", "mask_ratio"), ("max_epochs", "max_epoch"),
                                         ("weight_decy", "weight_decay")])
def test_unknown_key_names_closest_keys(key, closest):
    with pytest.raises(UserError) as e:
        MaeLite(**{key: "1"})
    msg = _one_line(e)
    assert key in msg
    assert re.search(rf"\b{closest}\b", msg.split(key, 1)[1]), msg  # the suggestion, after the bad key


def test_unknown_key_is_not_added():
    r = MaeLite()
    with pytest.raises(UserError):
        r.update({"lrr": "1e-3"})
    assert not hasattr(r, "lrr")
    assert r.lr is None


def test_update_returns_exactly_the_changed_values():
    r = MaeLite()
    changes = r.update({"max_epoch": "10", "mask_ratio": "0.75", "norm_pix_loss": "true", "scale": "0.2,1.0"})
    assert len(changes) == 2, changes
    by_key = {c.split(":")[0].strip(): c for c in changes}
    assert set(by_key) == {"max_epoch", "scale"}, changes
    assert re.search(r"400.*10", by_key["max_epoch"]), by_key["max_epoch"]
    assert re.search(r"0\.08.*0\.2", by_key["scale"]), by_key["scale"]
    assert r.update({"max_epoch": "10"}) == []  # same value again: nothing changed


def test_class_defaults_never_mutated_by_instance_update():
    r = MaeLite()
    r.update({"max_epoch": "10", "scale": "(0.3,0.9)", "opt_betas": "(0.8,0.9)", "lr": "1e-3", "exp_name": "x"})
    assert MaeLite.max_epoch == 400
    assert MaeLite.scale == (0.08, 1.0)
    assert MaeLite.opt_betas == (0.9, 0.95)
    assert MaeLite.lr is None
    assert MaeLite.exp_name == ""
    assert Recipe.opt_betas == (0.9, 0.999)  # the base class, which MaeLite overrides
    fresh = MaeLite()
    assert fresh.max_epoch == 400 and fresh.scale == (0.08, 1.0) and fresh.opt_betas == (0.9, 0.95)
    assert fresh.lr is None and fresh.scaled_lr == pytest.approx(2.4e-3, rel=1e-9)
    # two instances are independent
    a, b = MaeLite(), MaeLite()
    a.update({"batch_size": "1024"})
    assert b.batch_size == 4096


@pytest.mark.parametrize("options,key", [
    ({"mask_ratio": "1.0"}, "mask_ratio"),
    ({"mask_ratio": "-0.1"}, "mask_ratio"),
    ({"img_size": "30"}, "img_size"),  # 30 is not a multiple of 16
    ({"img_size": "32", "patch_size": "5"}, "img_size"),
    ({"weight_decay": "-0.05"}, "weight_decay"),
    ({"encoder_arch": "vit_tiny_patch16"}, "encoder_arch"),
    ({"encoder_arch": "mae_vit_tiny"}, "encoder_arch"),
    ({"batch_size": "0"}, "batch_size"),
    ({"max_epoch": "-1"}, "max_epoch"),
    ({"scale": "(0.9,0.1)"}, "scale"),
    ({"opt": "lamb"}, "opt"),
])
def test_validate_refuses_bad_values(options, key):
    with pytest.raises(UserError) as e:
        MaeLite(**options)
    assert key in _one_line(e)


@pytest.mark.parametrize("options,key", [
    ({"clip_grad": "-1"}, "clip_grad"),
    ({"depth": "-1"}, "depth"),
    ({"patch_size": "-4"}, "patch_size"),
    ({"lr": "-1e-3"}, "lr"),
    ({"hflip": "1.5"}, "hflip"),
])
def test_validate_refuses_more_bad_values(options, key):
    with pytest.raises(UserError) as e:
        MaeLite(**options)
    assert key in _one_line(e)


def test_validate_accepts_edge_values():
    MaeLite(mask_ratio="0.0")
    MaeLite(img_size="32", patch_size="4")
    MaeLite(img_size="48")  # 3 x 16
    MaeLite(weight_decay="0")
    MaeLite(encoder_arch="mae_vit_small_patch16")


def test_validate_called_directly_refuses_bad_attribute():
    r = MaeLite()
    r.mask_ratio = 1.0
    with pytest.raises(UserError) as e:
        r.validate()
    assert "mask_ratio" in _one_line(e)


# --------------------------------------------------------------------------------------------------
# build_recipe (-f, --exp-options, -b, -e)
# --------------------------------------------------------------------------------------------------
def test_build_recipe_applies_batch_and_epochs_on_top_of_options():
    r = build_recipe("mae_lite", ["max_epoch=10", "batch_size=512", "img_size=32", "patch_size=4"],
                     batch_size=1024, max_epoch=3)
    assert isinstance(r, MaeLite)
    assert r.batch_size == 1024 and r.max_epoch == 3
    assert r.img_size == 32 and r.patch_size == 4
    assert r.scaled_lr == pytest.approx(6e-4, rel=1e-9)  # scaling uses the -b value


def test_build_recipe_without_cli_values_keeps_options():
    r = build_recipe("mae_lite_exp.py", ["max_epoch=10", "batch_size=512"])
    assert r.batch_size == 512 and r.max_epoch == 10
    r = build_recipe("mae_lite", None)
    assert r.batch_size == 4096 and r.max_epoch == 400


def test_build_recipe_user_file_and_errors(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("from mae_lite.recipes import MaeLite\n\nclass Exp(MaeLite):\n    max_epoch = 12\n")
    r = build_recipe(str(path), ["mask_ratio=0.5"], batch_size=64)
    assert r.max_epoch == 12 and r.mask_ratio == 0.5 and r.batch_size == 64
    with pytest.raises(UserError):
        build_recipe("mae_lite", ["max_epoch"])
    with pytest.raises(UserError):
        build_recipe("mae_lite", None, batch_size=0)


# --------------------------------------------------------------------------------------------------
# config_table
# --------------------------------------------------------------------------------------------------
def test_config_table_lists_every_field_with_its_value():
    r = MaeLite(max_epoch="7", scale="(0.2,1.0)", exp_name="demo_run")
    table = r.config_table()
    lines = table.splitlines()
    fields = r.fields()
    for key in ["encoder_arch", "mask_ratio", "norm_pix_loss", "batch_size", "opt_betas", "basic_lr_per_img",
                "warmup_epochs", "scale", "ratio", "interpolation", "hflip", "weights_prefix", "seed", "lr"]:
        assert key in fields
    for key in fields:
        value = repr(getattr(r, key))
        rows = [ln for ln in lines if ln.split() and ln.split()[0] == key]
        assert len(rows) == 1, (key, rows)
        assert rows[0].rstrip().endswith(value), (key, rows[0], value)
    assert any(ln.split()[0] == "max_epoch" and ln.rstrip().endswith("7") for ln in lines if ln.split())
    assert any(ln.split()[0] == "scale" and ln.rstrip().endswith("(0.2, 1.0)") for ln in lines if ln.split())
    assert "'demo_run'" in table


@pytest.mark.parametrize("recipe", ["mae_lite", "finetuning", "mocov3", "mask_rcnn_vitdet_t_100ep"])
def test_every_recipe_refuses_a_zero_depth_and_passes_set_overrides_to_its_architecture(recipe):
    from mae_lite.recipes import resolve_recipe

    cls = resolve_recipe(recipe)
    with pytest.raises(UserError, match="'depth' must be >= 1"):
        cls(depth=0)
    assert cls(depth=2).arch_record()["kwargs"]["depth"] == 2
    assert "depth" not in cls().arch_record()["kwargs"]  # None: the architecture's own
