"""Model facts of MAE-Lite (fact sheet §3.1, §3.2, §3.6): registry, sizes, keys, maths (CPU, a few seconds).

Every expected value here is written out by hand from the fact sheet (parameter formulas, key lists with
shapes, the sin-cos formula, the masking and loss definitions) and never recomputed the way the package
computes it.
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

import mae_lite  # noqa: F401  (registers the architectures in timm)
from mae_lite.engine.checkpoint import load_pretrained, network_state, strip_prefix
from mae_lite.errors import UserError
from mae_lite.models import (MaskedAutoencoderViT, VisionTransformer, capture_attention, resize_pos_embed,
                             sincos_2d)

# A small configuration used wherever full size is not required: 8x8 grid of 4-px patches, 12 heads of dim 4.
SMALL_VIT = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=12, num_classes=10)
SMALL_MAE = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=12,
                 decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=3)

# (name, embed, depth, heads, patch) from fact sheet §3.1
VIT_TABLE = [
    ("vit_tiny_patch16", 192, 12, 12, 16),
    ("vit_small_patch16", 384, 12, 12, 16),
    ("vit_base_patch16", 768, 12, 12, 16),
    ("vit_large_patch16", 1024, 24, 16, 16),
    ("vit_huge_patch14", 1280, 32, 16, 14),
]
# (name, embed, depth, heads, decoder embed, decoder depth, decoder heads, patch) from fact sheet §3.2
MAE_TABLE = [
    ("mae_vit_tiny_patch16", 192, 12, 12, 96, 1, 3, 16),
    ("mae_vit_small_patch16", 384, 12, 12, 192, 1, 6, 16),
    ("mae_vit_base_patch16", 768, 12, 12, 512, 8, 16, 16),
    ("mae_vit_large_patch16", 1024, 24, 16, 512, 8, 16, 16),
    ("mae_vit_huge_patch14", 1280, 32, 16, 512, 8, 16, 14),
]


# ----- hand formulas ------------------------------------------------------------------------------
def block_params(d: int, mlp_ratio: int = 4) -> int:
    """norm1 + qkv (with bias) + proj + norm2 + fc1 + fc2 of one transformer block."""
    h = mlp_ratio * d
    return 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)


def vit_params(d: int, depth: int, patch: int, img: int = 224, classes: int = 1000, with_pos: bool = True) -> int:
    n = (img // patch) ** 2
    total = (3 * patch * patch * d + d) + d  # patch conv + cls token
    total += (n + 1) * d if with_pos else 0
    total += depth * block_params(d)
    total += 2 * d  # fc_norm (global pool) or norm
    total += d * classes + classes  # head
    return total


def mae_params(d: int, depth: int, dd: int, ddepth: int, patch: int, img: int = 224) -> int:
    n = (img // patch) ** 2
    enc = (3 * patch * patch * d + d) + d + (n + 1) * d + depth * block_params(d) + 2 * d
    v = patch * patch * 3  # pixels per patch
    dec = (d * dd + dd) + dd + (n + 1) * dd + ddepth * block_params(dd) + 2 * dd + (dd * v + v)
    return enc + dec


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def patchify_by_hand(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Patch index = row * w + col; value index = (pixel row * p + pixel col) * C + channel."""
    n, c, H, W = imgs.shape
    h, w = H // p, W // p
    out = torch.empty(n, h * w, p * p * c, dtype=imgs.dtype)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    for ch in range(c):
                        out[:, i * w + j, (a * p + b) * c + ch] = imgs[:, ch, i * p + a, j * p + b]
    return out


def tiny_block_keys(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
        f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
        f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
        f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
        f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
        f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,),
    }


def tiny_encoder_keys() -> dict[str, tuple[int, ...]]:
    keys = {
        "cls_token": (1, 1, 192),
        "pos_embed": (1, 197, 192),
        "patch_embed.proj.weight": (192, 3, 16, 16),
        "patch_embed.proj.bias": (192,),
    }
    for i in range(12):
        keys.update(tiny_block_keys(f"blocks.{i}", 192))
    return keys


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (LayerNorm affine too), moderate scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny_vit() -> VisionTransformer:
    """One full-size vit_tiny_patch16 at its initialisation (tests that change weights work on a copy)."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16")


@pytest.fixture(scope="module")
def tiny_mae() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return timm.create_model("mae_vit_tiny_patch16")


# ----- 1. registry ----------------------------------------------------------------------------------
def test_registry_builds_full_size(tiny_vit, tiny_mae):
    for name in ("vit_tiny_patch16", "vit_small_patch16", "mae_vit_tiny_patch16", "mae_vit_small_patch16"):
        assert timm.is_model(name)
    assert type(tiny_vit) is TimmViT  # timm's own class
    assert type(tiny_mae) is MaskedAutoencoderViT
    assert type(timm.create_model("mae_vit_small_patch16")) is MaskedAutoencoderViT


@pytest.mark.parametrize("name,embed,depth,heads,patch", VIT_TABLE)
def test_vit_registry_constructor_args(name, embed, depth, heads, patch, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def record(self, **kw):
        seen.update(kw)
        raise Stop

    # The constructor receives exactly the fact-sheet architecture (no module is built).
    with monkeypatch.context() as m:
        m.setattr(TimmViT, "__init__", record)
        with pytest.raises(Stop):
            timm.create_model(name)
    assert seen["embed_dim"] == embed and seen["depth"] == depth
    assert seen["num_heads"] == heads and seen["patch_size"] == patch
    assert seen.get("mlp_ratio", 4.0) == 4.0 and seen.get("qkv_bias", True) is True
    assert seen.get("img_size", 224) == 224 and seen["global_pool"] == "avg" and seen["norm_layer"](8).eps == 1e-6

    # And a cheap real build (one block) has the right modules.
    model = timm.create_model(name, depth=1)
    assert model.patch_embed.proj.kernel_size == (patch, patch) and model.patch_embed.proj.stride == (patch, patch)
    assert model.patch_embed.proj.out_channels == embed
    assert model.pos_embed.shape == (1, (224 // patch) ** 2 + 1, embed)
    attn = model.blocks[0].attn
    assert attn.num_heads == heads
    assert attn.qkv.out_features == 3 * embed and attn.qkv.bias is not None
    assert model.blocks[0].mlp.fc1.out_features == 4 * embed
    assert isinstance(model.blocks[0].mlp.act, nn.GELU)
    assert model.head.out_features == 1000


@pytest.mark.parametrize("name,embed,depth,heads,dembed,ddepth,dheads,patch", MAE_TABLE)
def test_mae_registry_full_arch_on_meta(name, embed, depth, heads, dembed, ddepth, dheads, patch):
    with torch.device("meta"):  # full size, no memory, no init cost
        model = timm.create_model(name)
    assert len(model.blocks) == depth and len(model.decoder_blocks) == ddepth
    assert model.patch_embed.proj.kernel_size == (patch, patch)
    assert model.patch_embed.proj.out_channels == embed
    assert model.blocks[0].attn.num_heads == heads and model.blocks[0].attn.qkv.out_features == 3 * embed
    assert model.decoder_embed.in_features == embed and model.decoder_embed.out_features == dembed
    assert model.decoder_blocks[0].attn.num_heads == dheads
    assert model.decoder_pred.out_features == patch * patch * 3
    assert model.pos_embed.shape == (1, (224 // patch) ** 2 + 1, embed)
    assert model.decoder_pos_embed.shape == (1, (224 // patch) ** 2 + 1, dembed)
    assert model.norm_pix_loss is False  # the original's class default; the recipe turns it on
    assert n_params(model) == mae_params(embed, depth, dembed, ddepth, patch)


@pytest.mark.parametrize("name", [r[0] for r in MAE_TABLE])
def test_pretrained_true_raises_clear_value_error(name):
    with pytest.raises(ValueError, match="pretrained=False"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", [r[0] for r in VIT_TABLE])
def test_pretrained_without_a_file_is_one_clear_line(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here: nothing is downloaded, one line says what to do
    with pytest.raises(UserError, match="pretrained_cfg_overlay=dict\\(file=PATH\\)") as e:
        timm.create_model(name, pretrained=True)
    assert "\n" not in str(e.value)


def test_registry_lists_all_names():
    names = set(timm.list_models("*vit_*_patch1*"))
    for n, *_ in VIT_TABLE + MAE_TABLE:
        assert n in names


# ----- 2. parameter counts --------------------------------------------------------------------------
def test_vit_tiny_param_count_by_hand(tiny_vit):
    model = tiny_vit
    assert vit_params(192, 12, 16) == 5_717_416  # the formula itself, against the fact sheet's ~5.7 M
    assert n_params(model) == 5_717_416
    assert n_params(model) - model.pos_embed.numel() == 5_679_592
    assert vit_params(192, 12, 16, with_pos=False) == 5_679_592
    assert round(n_params(model) / 1e6, 2) == 5.72


def test_tiny_and_small_have_12_heads():
    tiny = timm.create_model("vit_tiny_patch16", depth=1)
    small = timm.create_model("vit_small_patch16", depth=1)
    assert tiny.blocks[0].attn.num_heads == 12 and tiny.blocks[0].attn.scale == pytest.approx(16 ** -0.5)
    assert small.blocks[0].attn.num_heads == 12 and small.blocks[0].attn.scale == pytest.approx(32 ** -0.5)


def test_vit_small_param_count_by_hand():
    model = timm.create_model("vit_small_patch16")
    assert type(model) is TimmViT
    assert n_params(model) == vit_params(384, 12, 16)


def test_mae_tiny_param_count_and_decoder(tiny_mae):
    model = tiny_mae
    assert n_params(model) == mae_params(192, 12, 96, 1, 16)
    assert len(model.decoder_blocks) == 1
    assert model.decoder_blocks[0].attn.num_heads == 3
    assert model.decoder_embed.weight.shape == (96, 192)
    assert model.decoder_pred.weight.shape == (768, 96)
    # Frozen sin-cos tables are parameters (in the state dict) but not trainable.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n_params(model) - 197 * 192 - 197 * 96


# ----- 3. state-dict keys -----------------------------------------------------------------------------
def test_mae_tiny_state_dict_keys_and_shapes(tiny_mae):
    expected = tiny_encoder_keys()
    expected.update({"norm.weight": (192,), "norm.bias": (192,)})
    expected.update({
        "mask_token": (1, 1, 96),
        "decoder_embed.weight": (96, 192), "decoder_embed.bias": (96,),
        "decoder_pos_embed": (1, 197, 96),
        "decoder_norm.weight": (96,), "decoder_norm.bias": (96,),
        "decoder_pred.weight": (768, 96), "decoder_pred.bias": (768,),
    })
    expected.update(tiny_block_keys("decoder_blocks.0", 96))
    sd = tiny_mae.state_dict()
    assert set(sd) == set(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_vit_tiny_state_dict_keys_global_pool(tiny_vit):
    expected = tiny_encoder_keys()
    expected.update({"fc_norm.weight": (192,), "fc_norm.bias": (192,),
                     "head.weight": (1000, 192), "head.bias": (1000,)})
    sd = tiny_vit.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert not any(k.startswith("norm.") for k in sd)


def test_vit_tiny_state_dict_keys_cls_token_pool():
    expected = tiny_encoder_keys()
    expected.update({"norm.weight": (192,), "norm.bias": (192,),
                     "head.weight": (1000, 192), "head.bias": (1000,)})
    sd = timm.create_model("vit_tiny_patch16", global_pool=False).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert not any(k.startswith("fc_norm") for k in sd)


@pytest.mark.parametrize("arch", ["mae", "vit"])
@pytest.mark.parametrize("prefix", ["module.model.", "model."])
def test_released_checkpoint_prefix_loads_strictly(arch, prefix):
    torch.manual_seed(0)
    cls, cfg = (MaskedAutoencoderViT, SMALL_MAE) if arch == "mae" else (VisionTransformer, SMALL_VIT)
    src = cls(**cfg)
    randomize_(src, seed=1)
    ckpt = {"start_epoch": 400, "model": {prefix + k: v.clone() for k, v in src.state_dict().items()}}
    net = network_state(ckpt, "model")
    assert set(net) == set(src.state_dict())
    dst = cls(**cfg)
    dst.load_state_dict(net, strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_released_tiny_checkpoints_load_strictly(tiny_vit, tiny_mae):
    """The 8-GPU pre-training (MAE) and fine-tuning (ViT) checkpoints of §3.6: keys `module.model.*`."""
    for model, fresh in ((tiny_mae, timm.create_model("mae_vit_tiny_patch16")), (tiny_vit, copy.deepcopy(tiny_vit))):
        sd = {"module.model." + k: torch.randn_like(v) for k, v in model.state_dict().items()}
        net = network_state({"model": sd, "optimizer": {}, "start_epoch": 400}, "model")
        fresh.load_state_dict(net, strict=True)
        key = "blocks.11.attn.qkv.weight"
        assert torch.equal(fresh.state_dict()[key], sd["module.model." + key])


def test_strip_prefix_rules():
    t = torch.zeros(1)
    # DDP `module.` dropped only when every key has it; keys outside the prefix are left out.
    state = {"module.model.a": t, "module.model.b.c": t, "module.tch_model.a": t}
    assert set(strip_prefix(state, "model")) == {"a", "b.c"}
    assert set(strip_prefix({"model.a": t, "module.x": t}, "model")) == {"a"}
    assert set(strip_prefix({"a": t, "b": t}, "")) == {"a", "b"}
    # The prefix must be a whole leading component, not a substring (`model.` inside `tch_model.`).
    assert set(strip_prefix({"tch_model.a": t, "model.b": t}, "model")) == {"b"}


def test_mae_checkpoint_into_vit_keeps_what_the_original_keeps():
    """§3.6: decoder, mask_token and MAE `norm.*` are ignored; fc_norm/head stay at init; the fixed sin-cos
    table is copied into the learnable pos_embed."""
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**SMALL_MAE)
    vit = VisionTransformer(**SMALL_VIT)
    ckpt = {"model": {"module.model." + k: v for k, v in mae.state_dict().items()}}
    report = load_pretrained(vit, ckpt)
    skipped = set(report.skipped)
    assert {"mask_token", "norm.weight", "norm.bias", "decoder_pos_embed", "decoder_pred.weight"} <= skipped
    assert all(k.startswith(("decoder", "mask_token", "norm.")) for k in skipped)
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert torch.equal(vit.pos_embed.detach(), mae.pos_embed.detach())
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    assert torch.count_nonzero(vit.head.weight) == 0
    assert vit.pos_embed.requires_grad  # still learnable in the classifier


# ----- 4. parity with timm's own ViT -----------------------------------------------------------------
def _timm_twin(global_pool: bool, **cfg) -> TimmViT:
    return TimmViT(global_pool="avg" if global_pool else "token", fc_norm=global_pool, qkv_bias=True, mlp_ratio=4.0,
                   **cfg)


@pytest.mark.parametrize("global_pool", [True, False])
def test_parity_with_timm_vit_small_config(global_pool):
    torch.manual_seed(0)
    ours = VisionTransformer(**SMALL_VIT, global_pool=global_pool).eval()
    randomize_(ours, seed=3)
    ref = _timm_twin(global_pool, **SMALL_VIT).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (3, 10)
    assert a.abs().max() > 0.1  # non-trivial logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_parity_with_timm_vit_tiny_full_size(tiny_vit):
    torch.manual_seed(0)
    ours = copy.deepcopy(tiny_vit).eval()
    randomize_(ours, seed=4)
    # weight_init="skip": every tensor is overwritten by the strict load below
    ref = TimmViT(embed_dim=192, depth=12, num_heads=12, global_pool="avg", fc_norm=True, weight_init="skip").eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (1, 1000) and a.abs().max() > 0.1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----- 5. masking -----------------------------------------------------------------------------------
@pytest.mark.parametrize("L,ratio,keep", [(196, 0.75, 49), (64, 0.75, 16), (196, 0.5, 98), (10, 0.75, 2),
                                          (196, 0.9, 19), (256, 0.75, 64)])
def test_random_masking_invariants(L, ratio, keep):
    torch.manual_seed(0)
    N, D = 4, 5
    # token l of sample n carries (l, n) so the kept tokens can be identified
    x = torch.stack([torch.arange(L, dtype=torch.float32)[None, :].expand(N, L),
                     torch.arange(N, dtype=torch.float32)[:, None].expand(N, L)], dim=-1)
    x = torch.cat([x, torch.zeros(N, L, D - 2)], dim=-1)
    kept, mask, ids_restore, ids_shuffle = MaskedAutoencoderViT.random_masking(x, ratio)
    assert kept.shape == (N, keep, D)
    assert mask.shape == (N, L) and ids_restore.shape == (N, L) and ids_shuffle.shape == (N, L)
    for n in range(N):
        assert sorted(ids_shuffle[n].tolist()) == list(range(L))  # a permutation
        assert [int(ids_shuffle[n, int(ids_restore[n, l])]) for l in range(L)] == list(range(L))
        kept_ids = ids_shuffle[n, :keep].tolist()
        assert kept[n, :, 0].tolist() == [float(i) for i in kept_ids]
        assert torch.all(kept[n, :, 1] == n)
        expected = [0.0 if l in set(kept_ids) else 1.0 for l in range(L)]
        assert mask[n].tolist() == expected
        assert mask[n].sum().item() == L - keep
    if keep > 2:
        masks = {tuple(m.tolist()) for m in mask}
        assert len(masks) == N  # per-sample masks


def test_random_masking_with_given_shuffle_and_bad_shape():
    x = torch.randn(2, 6, 3)
    ids = torch.tensor([[5, 0, 3, 1, 2, 4], [0, 1, 2, 3, 4, 5]])
    kept, mask, ids_restore, ids_shuffle = MaskedAutoencoderViT.random_masking(x, 0.5, ids)
    assert torch.equal(ids_shuffle, ids)
    assert mask.tolist() == [[0, 1, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert ids_restore.tolist() == [[1, 3, 4, 2, 5, 0], [0, 1, 2, 3, 4, 5]]
    assert torch.equal(kept[0], x[0, [5, 0, 3]]) and torch.equal(kept[1], x[1, [0, 1, 2]])
    with pytest.raises(ValueError):
        MaskedAutoencoderViT.random_masking(x, 0.5, ids[:, :5])


def test_mae_forward_returns_and_reuses_shuffle():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**SMALL_MAE, norm_pix_loss=True).eval()
    imgs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(imgs)
        assert isinstance(out, tuple) and len(out) == 4
        loss, pred, mask, ids_shuffle = out
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert pred.shape == (4, 64, 4 * 4 * 3)
        assert mask.shape == (4, 64) and ids_shuffle.shape == (4, 64)
        assert torch.all(mask.sum(1) == 64 - 16)
        for n in range(4):
            assert torch.all(mask[n, ids_shuffle[n, :16]] == 0) and torch.all(mask[n, ids_shuffle[n, 16:]] == 1)
        assert len({tuple(m.tolist()) for m in mask}) == 4
        # The same shuffle (as for the teacher) gives the same mask, prediction and loss.
        loss2, pred2, mask2, ids2 = model(imgs, ids_shuffle=ids_shuffle)
        assert torch.equal(ids2, ids_shuffle) and torch.equal(mask2, mask)
        torch.testing.assert_close(pred2, pred)
        torch.testing.assert_close(loss2, loss)
        # A different shuffle changes the mask.
        _, _, mask3, _ = model(imgs, ids_shuffle=ids_shuffle.flip(1))
        assert not torch.equal(mask3, mask)
        # The returned loss is the masked-patch loss of the returned prediction (hand formula, §3.2).
        assert loss.item() == pytest.approx(_norm_pix_loss_by_hand(imgs, pred, mask, 4, True), rel=1e-5)


def test_mae_masked_pixels_do_not_reach_the_prediction():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**SMALL_MAE).eval()
    imgs = torch.randn(1, 3, 32, 32)
    ids = torch.randperm(64)[None]
    masked_patch, kept_patch = int(ids[0, -1]), int(ids[0, 0])

    def poke(patch):
        out = imgs.clone()
        r, c = divmod(patch, 8)
        out[:, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 3.0
        return out

    with torch.no_grad():
        _, pred, _, _ = model(imgs, ids_shuffle=ids)
        _, pred_m, _, _ = model(poke(masked_patch), ids_shuffle=ids)
        _, pred_k, _, _ = model(poke(kept_patch), ids_shuffle=ids)
    torch.testing.assert_close(pred_m, pred)  # a masked patch is never seen
    assert (pred_k - pred).abs().max() > 1e-3  # a visible one is


def test_mae_encoder_and_decoder_unshuffle_by_hand():
    """With no blocks, encoder/decoder reduce to formulas that pin down gather/un-shuffle and positions."""
    torch.manual_seed(0)
    cfg = dict(SMALL_MAE, depth=0, decoder_depth=0)
    model = MaskedAutoencoderViT(**cfg).eval()
    randomize_(model, seed=5)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(48, 8, cls_token=True)[None])
        model.decoder_pos_embed.copy_(sincos_2d(24, 8, cls_token=True)[None])
    imgs = torch.randn(2, 3, 32, 32)
    ids = torch.stack([torch.randperm(64) for _ in range(2)])
    keep = 16
    with torch.no_grad():
        latent, mask, ids_restore, _ = model.forward_encoder(imgs, 0.75, ids)
        _, pred, _, _ = model(imgs, ids_shuffle=ids)
        # Patch embedding as a linear map on (c, row, col)-flattened patches.
        W = model.patch_embed.proj.weight.reshape(48, -1)
        b = model.patch_embed.proj.bias
        pe, pd = model.pos_embed[0], model.decoder_pos_embed[0]
        n_w, n_b = model.norm.weight, model.norm.bias
        dn_w, dn_b = model.decoder_norm.weight, model.decoder_norm.bias
        for n in range(2):
            cls = layer_norm(model.cls_token[0, 0] + pe[0], n_w, n_b)
            torch.testing.assert_close(latent[n, 0], cls, atol=1e-5, rtol=1e-5)
            for j in range(keep):
                l = int(ids[n, j])
                r, c = divmod(l, 8)
                patch = imgs[n, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].reshape(-1)
                tok = layer_norm(W @ patch + b + pe[1 + l], n_w, n_b)
                torch.testing.assert_close(latent[n, 1 + j], tok, atol=1e-5, rtol=1e-5)
            position = {int(ids[n, j]): j for j in range(keep)}
            for l in range(64):
                if l in position:
                    t = model.decoder_embed(latent[n, 1 + position[l]])
                else:
                    t = model.mask_token[0, 0]
                expect = model.decoder_pred(layer_norm(t + pd[1 + l], dn_w, dn_b))
                torch.testing.assert_close(pred[n, l], expect, atol=1e-5, rtol=1e-5)


# ----- 6. patchify / unpatchify -----------------------------------------------------------------------
def test_patchify_ordering_by_hand():
    model = MaskedAutoencoderViT(**SMALL_MAE)
    p = 4
    imgs = torch.randn(2, 3, 32, 32)
    x = model.patchify(imgs)
    assert x.shape == (2, 64, p * p * 3)
    torch.testing.assert_close(x, patchify_by_hand(imgs, p), atol=0, rtol=0)
    for c in range(3):
        # patch (row 0, col 1), pixel (0, 0), channel c
        assert torch.equal(x[:, 1, c], imgs[:, c, 0, p])
        # patch (row 1, col 0), pixel (2, 3), channel c
        assert torch.equal(x[:, 8, (2 * p + 3) * 3 + c], imgs[:, c, p + 2, 3])


def test_patchify_unpatchify_round_trip_and_non_square():
    model = MaskedAutoencoderViT(**SMALL_MAE)
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    x = torch.randn(2, 64, 48)
    assert torch.equal(model.patchify(model.unpatchify(x)), x)
    rect = torch.randn(1, 3, 8, 12)
    xr = model.patchify(rect)
    assert xr.shape == (1, 6, 48)
    torch.testing.assert_close(xr, patchify_by_hand(rect, 4), atol=0, rtol=0)
    assert torch.equal(model.unpatchify(xr, grid=(2, 3)), rect)
    with pytest.raises(ValueError):
        model.patchify(torch.randn(1, 3, 30, 32))


# ----- 7. loss --------------------------------------------------------------------------------------
def _norm_pix_loss_by_hand(imgs, pred, mask, p, norm_pix):
    target = patchify_by_hand(imgs, p)
    N, L, V = target.shape
    total, count = 0.0, 0.0
    for n in range(N):
        for l in range(L):
            t = target[n, l].double()
            if norm_pix:
                mean = t.sum() / V
                var = ((t - mean) ** 2).sum() / (V - 1)  # unbiased
                t = (t - mean) / math.sqrt(var.item() + 1e-6)
            err = ((pred[n, l].double() - t) ** 2).sum().item() / V
            total += err * float(mask[n, l])
            count += float(mask[n, l])
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_forward_loss_by_hand(norm_pix):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**SMALL_MAE, norm_pix_loss=norm_pix)
    imgs = torch.rand(2, 3, 32, 32) * 2 + torch.arange(2.0)[:, None, None, None]
    pred = torch.randn(2, 64, 48)
    mask = (torch.rand(2, 64) < 0.75).float()
    got = model.forward_loss(imgs, pred, mask).item()
    assert got == pytest.approx(_norm_pix_loss_by_hand(imgs, pred, mask, 4, norm_pix), rel=1e-5)
    # Changing the prediction of a visible (mask 0) patch does not change the loss.
    l = int((mask[0] == 0).nonzero()[0])
    pred2 = pred.clone()
    pred2[0, l] += 10
    assert model.forward_loss(imgs, pred2, mask).item() == pytest.approx(got, rel=1e-6)


def test_norm_pix_target_uses_unbiased_variance():
    model = MaskedAutoencoderViT(img_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=0, num_heads=2,
                                 decoder_embed_dim=4, decoder_depth=0, decoder_num_heads=1, norm_pix_loss=True)
    img = torch.zeros(1, 1, 4, 4)
    img[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # patch 0 = (1, 2, 3, 4)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # mean 2.5, unbiased var = (2.25+0.25+0.25+2.25)/3 = 5/3; target = (x-2.5)/sqrt(5/3+1e-6)
    s = math.sqrt(5 / 3 + 1e-6)
    target0 = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / s
    pred = torch.zeros(1, 4, 4)
    pred[0, 0] = target0
    assert model.forward_loss(img, pred, mask).item() == pytest.approx(0.0, abs=1e-10)
    # zero prediction: loss = mean(target0^2) = (2.25+0.25+0.25+2.25)/4 / (5/3) = 0.75
    assert model.forward_loss(img, torch.zeros(1, 4, 4), mask).item() == pytest.approx(1.25 / (5 / 3 + 1e-6), rel=1e-6)


# ----- 8. sin-cos position embedding ----------------------------------------------------------------------
def sincos_entry(D: int, h: int, w: int, i: int) -> float:
    q = D // 4
    omega = lambda k: 1.0 / 10000 ** (k / q)  # noqa: E731
    if i < q:
        return math.sin(w * omega(i))
    if i < 2 * q:
        return math.cos(w * omega(i - q))
    if i < 3 * q:
        return math.sin(h * omega(i - 2 * q))
    return math.cos(h * omega(i - 3 * q))


def test_sincos_2d_full_small_table_by_formula():
    D, H, W = 16, 3, 4
    table = sincos_2d(D, (H, W), cls_token=True)
    assert table.shape == (1 + H * W, D) and table.dtype == torch.float32
    assert torch.all(table[0] == 0)
    for h in range(H):
        for w in range(W):
            for i in range(D):
                assert table[1 + h * W + w, i].item() == pytest.approx(sincos_entry(D, h, w, i), abs=1e-6)
    assert sincos_2d(D, 3).shape == (9, D)  # no cls row


def test_sincos_2d_tiny_entries():
    table = sincos_2d(192, 14, cls_token=True)
    assert table.shape == (197, 192)
    for h, w, i in [(0, 0, 0), (0, 0, 48), (3, 5, 0), (3, 5, 1), (3, 5, 47), (3, 5, 48), (3, 5, 95),
                    (3, 5, 96), (3, 5, 150), (3, 5, 191), (13, 0, 10), (0, 13, 10), (13, 13, 60), (7, 2, 120)]:
        assert table[1 + h * 14 + w, i].item() == pytest.approx(sincos_entry(192, h, w, i), abs=1e-6)
    # column 0 of the patch grid: w = 0 -> first quarter sin(0)=0, second quarter cos(0)=1
    assert torch.all(table[1::14, :48] == 0) and torch.all(table[1::14, 48:96] == 1)
    with pytest.raises(ValueError):
        sincos_2d(190, 14)


def test_mae_pos_embeds_are_fixed_sincos(tiny_mae):
    model = MaskedAutoencoderViT(**SMALL_MAE)
    for table, D in [(model.pos_embed, 48), (model.decoder_pos_embed, 24)]:
        assert isinstance(table, nn.Parameter) and table.requires_grad is False
        assert table.shape == (1, 65, D)
        assert torch.all(table[0, 0] == 0)
        for h, w, i in [(0, 1, 0), (2, 5, 3), (7, 7, D // 4), (4, 3, D // 2), (6, 1, 3 * D // 4 + 1), (5, 0, D - 1)]:
            assert table[0, 1 + h * 8 + w, i].item() == pytest.approx(sincos_entry(D, h, w, i), abs=1e-6)
    tiny = tiny_mae
    assert tiny.pos_embed[0, 1 + 3 * 14 + 5, 100].item() == pytest.approx(sincos_entry(192, 3, 5, 100), abs=1e-6)
    assert tiny.decoder_pos_embed[0, 1 + 3 * 14 + 5, 70].item() == pytest.approx(sincos_entry(96, 3, 5, 70), abs=1e-6)
    assert "pos_embed" in tiny.state_dict() and "decoder_pos_embed" in tiny.state_dict()


# ----- 9. attention logits -----------------------------------------------------------------------------
def test_capture_attention_logits_by_hand():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL_VIT).eval()
    randomize_(model, seed=6)
    x = torch.randn(2, 3, 32, 32)
    heads, hd = 12, 4
    with torch.no_grad():
        with capture_attention(model, layers=[0]) as caught:
            model(x)
        assert set(caught) == {0}
        logits = caught[0]
        assert logits.shape == (2, heads, 65, 65)
        # By hand: tokens -> norm1 -> qkv -> q k^T / sqrt(head_dim)
        tok = model.patch_embed(x)
        tok = torch.cat([model.cls_token.expand(2, -1, -1), tok], 1) + model.pos_embed
        blk = model.blocks[0]
        n1 = layer_norm(tok, blk.norm1.weight, blk.norm1.bias)
        qkv = n1 @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # [B, N, 3*C], laid out (3, heads, hd)
        q = qkv[..., :48].reshape(2, 65, heads, hd).transpose(1, 2)
        k = qkv[..., 48:96].reshape(2, 65, heads, hd).transpose(1, 2)
        expected = q @ k.transpose(-2, -1) * hd ** -0.5
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_hooked_block_equals_sdpa_block_and_hooks_are_removed():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL_VIT).eval()
    randomize_(model, seed=7)
    x = torch.randn(2, 3, 32, 32)
    tok = torch.randn(2, 65, 48)
    with torch.no_grad():
        plain_blk, plain_out = model.blocks[0](tok), model(x)
        with capture_attention(model) as caught:
            hooked_blk, hooked_out = model.blocks[0](tok), model(x)
            assert len(model.blocks[0].attn.k_norm._forward_hooks) == 1
        assert set(caught) == {0, 1}
    torch.testing.assert_close(hooked_blk, plain_blk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked_out, plain_out, atol=1e-5, rtol=1e-5)
    # By hand: softmax(logits) @ v, heads merged, proj.
    with torch.no_grad():
        blk = model.blocks[0]
        n1 = layer_norm(tok, blk.norm1.weight, blk.norm1.bias)
        qkv = (n1 @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(2, 65, 3, 12, 4).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1) * 0.5).softmax(-1) @ qkv[2]
        att = att.transpose(1, 2).reshape(2, 65, 48) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        y = tok + att
        h = layer_norm(y, blk.norm2.weight, blk.norm2.bias)
        hidden = F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        y = y + F.linear(hidden, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    torch.testing.assert_close(plain_blk, y, atol=1e-5, rtol=1e-5)
    for b in model.blocks:
        assert not (b.attn.q_norm._forward_hooks or b.attn.k_norm._forward_hooks or b.attn._forward_pre_hooks)


def test_hooks_removed_after_exception_and_work_on_mae():
    model = MaskedAutoencoderViT(**SMALL_MAE).eval()
    with pytest.raises(RuntimeError):
        with capture_attention(model, layers=[1]):
            raise RuntimeError("boom")
    assert all(not (b.attn.q_norm._forward_hooks or b.attn.k_norm._forward_hooks) for b in model.blocks)
    with torch.no_grad(), capture_attention(model, layers=[0, 1]) as caught:
        model(torch.randn(2, 3, 32, 32))
    # encoder sees cls + 16 kept tokens; 12 heads
    assert caught[0].shape == (2, 12, 17, 17) and caught[1].shape == (2, 12, 17, 17)


# ----- 10. position-embedding resizing and load_pretrained ---------------------------------------------------
def test_resize_pos_embed():
    D = 6
    torch.manual_seed(0)
    src = torch.randn(1, 17, D)
    out = resize_pos_embed(src, (8, 8))
    assert out.shape == (1, 65, D)
    assert torch.equal(out[:, 0], src[:, 0])
    const = torch.cat([torch.randn(1, 1, D), torch.arange(D, dtype=torch.float32).expand(1, 16, D)], 1)
    out = resize_pos_embed(const, (8, 8))
    torch.testing.assert_close(out[0, 1:], torch.arange(D, dtype=torch.float32).expand(64, D), atol=1e-5, rtol=0)
    assert resize_pos_embed(src, (4, 4)) is src or torch.equal(resize_pos_embed(src, (4, 4)), src)
    with pytest.raises(ValueError):
        resize_pos_embed(torch.randn(1, 1 + 15, D), (8, 8))


def test_load_pretrained_resizes_pos_embed_32_to_64px():
    torch.manual_seed(0)
    src = VisionTransformer(**SMALL_VIT)
    randomize_(src, seed=8)
    with torch.no_grad():  # grid of per-channel constants: must stay constant after resizing
        src.pos_embed[0, 1:] = torch.linspace(-1, 1, 48)
    dst = VisionTransformer(**dict(SMALL_VIT, img_size=64))
    report = load_pretrained(dst, {"model": {"model." + k: v for k, v in src.state_dict().items()}})
    assert len(report.resized) == 1 and report.resized[0].startswith("pos_embed")
    assert report.skipped == [] and report.missing == []
    assert dst.pos_embed.shape == (1, 1 + 16 * 16, 48)
    assert torch.equal(dst.pos_embed[0, 0], src.pos_embed[0, 0])
    torch.testing.assert_close(dst.pos_embed[0, 1:].detach(), torch.linspace(-1, 1, 48).expand(256, 48),
                               atol=1e-5, rtol=0)
    assert torch.equal(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(dst.head.weight, src.head.weight)


def test_load_pretrained_skips_mismatched_shapes():
    torch.manual_seed(0)
    src = VisionTransformer(**SMALL_VIT)  # 10 classes
    randomize_(src, seed=9)
    ckpt = {"model": {"model." + k: v for k, v in src.state_dict().items()}}
    dst = VisionTransformer(**dict(SMALL_VIT, num_classes=5))
    report = load_pretrained(dst, ckpt)
    assert sorted(report.skipped) == ["head.bias", "head.weight"]
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert torch.count_nonzero(dst.head.weight) == 0 and torch.count_nonzero(dst.head.bias) == 0
    assert torch.equal(dst.fc_norm.weight, src.fc_norm.weight)
    # A pos_embed of another width cannot be resized: skipped, left at init.
    other = VisionTransformer(**dict(SMALL_VIT, embed_dim=24, depth=1))
    dst2 = VisionTransformer(**dict(SMALL_VIT, img_size=64))
    before = dst2.pos_embed.detach().clone()
    report = load_pretrained(dst2, {"model": other.state_dict()}, prefix="")
    assert "pos_embed" in report.skipped and "pos_embed" in report.missing
    assert torch.equal(dst2.pos_embed.detach(), before)
    # `drop` (transfer Exp drops any key containing "head")
    dst3 = VisionTransformer(**SMALL_VIT)
    report = load_pretrained(dst3, ckpt, drop=("head",))
    assert sorted(report.skipped) == ["head.bias", "head.weight"]
    assert torch.count_nonzero(dst3.head.weight) == 0


def test_load_pretrained_keeps_fixed_sincos_of_larger_mae():
    torch.manual_seed(0)
    src = MaskedAutoencoderViT(**SMALL_MAE)
    dst = MaskedAutoencoderViT(**dict(SMALL_MAE, img_size=64))
    report = load_pretrained(dst, {"model": {"module.model." + k: v for k, v in src.state_dict().items()}})
    assert "pos_embed" in report.missing and "decoder_pos_embed" in report.missing
    assert report.resized == []
    torch.testing.assert_close(dst.pos_embed[0].detach(), sincos_2d(48, 16, cls_token=True))
    torch.testing.assert_close(dst.decoder_pos_embed[0].detach(), sincos_2d(24, 16, cls_token=True))
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


# ----- 11. initialisation ------------------------------------------------------------------------------
def test_vit_init_facts():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16", drop_path_rate=0.1)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(lns) == 2 * 12 + 1
    for m in lns:
        assert m.eps == 1e-6 and torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = model.blocks[3].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.001 and w.abs().max() <= 2.0  # trunc-normal(0.02)
    assert torch.count_nonzero(model.blocks[3].mlp.fc1.bias) == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    params = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() & params == {"pos_embed", "cls_token"}
    # stochastic depth grows linearly from 0 to drop_path_rate
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)
    for i in range(1, 12):
        assert model.blocks[i].drop_path1.drop_prob == pytest.approx(0.1 * i / 11)


def test_mae_init_facts(tiny_mae):
    model = tiny_mae
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(lins) == 12 * 4 + 4 + 2  # 4 per block, decoder embed and pred
    for m in lins:
        assert torch.count_nonzero(m.bias) == 0
        bound = math.sqrt(6 / (m.in_features + m.out_features))  # xavier-uniform
        assert m.weight.abs().max() <= bound + 1e-7
    qkv = model.blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - math.sqrt(6 / (192 + 576)) / math.sqrt(3)) < 0.002
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert m.eps == 1e-6 and torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # patch embedding: xavier-uniform on the flattened [192, 768] view (fan_in 768, fan_out 192)
    pw = model.patch_embed.proj.weight
    bound = math.sqrt(6 / (3 * 16 * 16 + 192))
    assert pw.abs().max() <= bound + 1e-7 and pw.abs().max() > 0.95 * bound
    for t in (model.cls_token, model.mask_token):  # N(0, 0.02)
        assert 0.01 < t.std().item() < 0.03


def test_global_pool_accepts_timm_spellings_and_refuses_others():
    for pool, name in ((True, "avg"), (False, "token"), ("avg", "avg"), ("token", "token")):
        m = timm.create_model("vit_tiny_patch16", img_size=32, patch_size=4, depth=1, global_pool=pool)
        keys = set(m.state_dict())
        assert m.global_pool == name and ("fc_norm.weight" in keys) == (name == "avg")
        assert ("norm.weight" in keys) == (name == "token")
    with pytest.raises(AssertionError) as refused:
        timm.create_model("vit_tiny_patch16", img_size=32, patch_size=4, depth=1, global_pool="mean")
    assert "pooling" in str(refused.value) or not str(refused.value)  # timm < 1.0.31 asserts without a message


def test_mae_refuses_input_of_another_size():
    m = timm.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=4, depth=1)
    with pytest.raises(ValueError, match="built for"):
        m(torch.randn(1, 3, 64, 64))
