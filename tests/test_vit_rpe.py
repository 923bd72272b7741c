"""Facts of the RPE fine-tuning ViT `vit_tiny_patch16_rpe` (fact sheet §3.3, §3.6, §4.6), CPU, a few seconds.

Expected values are written out by hand from the fact sheet (index entries, a whole index matrix for a
2x3 grid, key lists with shapes, a parameter formula, init statistics) or computed by hand from the
weights (attention logits, a whole block), never by re-running the model's own code.
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import mae_lite  # noqa: F401  (registers the architectures in timm)
from timm.models.beit import Beit

from mae_lite.engine.checkpoint import load_pretrained, network_state
from mae_lite.errors import UserError
from mae_lite.models import VisionTransformerRPE, capture_attention

# 8x8 grid of 4-px patches (65 tokens), 12 heads of dim 4.
SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=12, num_classes=10)
# 12x12 grid (145 tokens > 100): the CPU takes the scaled_dot_product_attention path here.
LONG = dict(SMALL, img_size=48)
BLOCK_FIELDS = ("gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
                "attn.qkv.weight", "attn.relative_position_bias_table", "attn.relative_position_index",
                "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


# ----- hand helpers -----------------------------------------------------------------------------------
def tok(r: int, c: int, w: int = 14) -> int:
    """Token number of patch (row r, column c); token 0 is cls."""
    return 1 + r * w + c


def hand_index(h: int, w: int) -> torch.Tensor:
    """The index table element by element from the fact-sheet rules (loops, no tensor arithmetic)."""
    n = h * w + 1
    size = (2 * h - 1) * (2 * w - 1) + 3
    out = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == 0 and j == 0:
                out[i][j] = size - 1
            elif i == 0:
                out[i][j] = size - 3
            elif j == 0:
                out[i][j] = size - 2
            else:
                (ri, ci), (rj, cj) = divmod(i - 1, w), divmod(j - 1, w)
                out[i][j] = (ri - rj + h - 1) * (2 * w - 1) + (ci - cj + w - 1)
    return torch.tensor(out, dtype=torch.long)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere: LayerNorm near 1, biases/gammas/tables clearly non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g))  # order 1, so the bias visibly moves the logits
            elif "gamma" in name:
                p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def hand_logits(blk: nn.Module, x: torch.Tensor, grid: tuple[int, int], heads: int) -> tuple[torch.Tensor, ...]:
    """(logits with bias, v) of one block for input tokens x, from its weights."""
    B, N, C = x.shape
    hd = C // heads
    n1 = layer_norm(x, blk.norm1.weight, blk.norm1.bias)
    w = blk.attn.qkv.weight  # rows laid out (q | k | v), each (heads, hd)
    q = (n1 @ w[:C].T + blk.attn.q_bias).reshape(B, N, heads, hd).transpose(1, 2)
    k = (n1 @ w[C:2 * C].T).reshape(B, N, heads, hd).transpose(1, 2)  # no k bias
    v = (n1 @ w[2 * C:].T + blk.attn.v_bias).reshape(B, N, heads, hd).transpose(1, 2)
    table = blk.attn.relative_position_bias_table  # [T, heads]
    bias = table[hand_index(*grid)].permute(2, 0, 1)  # [heads, N, N]
    return q @ k.transpose(-2, -1) / math.sqrt(hd) + bias, v


def hand_block(blk: nn.Module, x: torch.Tensor, grid: tuple[int, int], heads: int) -> torch.Tensor:
    B, N, C = x.shape
    logits, v = hand_logits(blk, x, grid, heads)
    att = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    att = att @ blk.attn.proj.weight.T + blk.attn.proj.bias
    y = x + blk.gamma_1 * att
    h = layer_norm(y, blk.norm2.weight, blk.norm2.bias)
    m = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return y + blk.gamma_2 * m


def rpe_params(d: int = 192, depth: int = 12, heads: int = 12, patch: int = 16, img: int = 224,
               classes: int = 1000) -> int:
    g = img // patch
    n = g * g
    block = (2 * d                      # norm1
             + 3 * d * d + 2 * d          # qkv weight (no bias) + q_bias + v_bias
             + ((2 * g - 1) ** 2 + 3) * heads  # relative position table
             + d * d + d                  # proj
             + 2 * d                      # norm2
             + d * 4 * d + 4 * d + 4 * d * d + d  # fc1, fc2
             + 2 * d)                     # gamma_1, gamma_2
    return (3 * patch * patch * d + d) + d + (n + 1) * d + depth * block + 2 * d + d * classes + classes


@pytest.fixture(scope="module")
def tiny_rpe() -> VisionTransformerRPE:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_rpe", use_abs_pos_emb=True)  # as the RPE recipe builds it


# ----- registry and arguments -------------------------------------------------------------------------------
def test_registry_and_pretrained_refused(tiny_rpe):
    assert timm.is_model("vit_tiny_patch16_rpe")
    assert "vit_tiny_patch16_rpe" in timm.list_models("*rpe*")
    assert type(tiny_rpe) is VisionTransformerRPE and isinstance(tiny_rpe, Beit)  # timm's own class
    assert (tiny_rpe.embed_dim, len(tiny_rpe.blocks), tiny_rpe.global_pool) == (192, 12, "avg")
    assert timm.create_model("vit_tiny_patch16_rpe", depth=1).pos_embed is None  # the original factory's default
    assert all(b.attn.num_heads == 12 for b in tiny_rpe.blocks)
    assert tiny_rpe.blocks[0].attn.scale == pytest.approx(16 ** -0.5)
    assert tiny_rpe.blocks[0].norm1.eps == 1e-6 and tiny_rpe.fc_norm.eps == 1e-6
    assert tiny_rpe.blocks[0].mlp.fc1.out_features == 768
    with pytest.raises(UserError, match="pretrained_cfg_overlay"):
        timm.create_model("vit_tiny_patch16_rpe", pretrained=True, pretrained_cfg_overlay=dict(file="/nonexistent"))


def test_keyword_arguments_override_the_arch():
    m = timm.create_model("vit_tiny_patch16_rpe", img_size=32, patch_size=4, depth=3, num_classes=7,
                          drop_path_rate=0.2, use_abs_pos_emb=True)
    assert len(m.blocks) == 3 and m.head.out_features == 7
    assert m.pos_embed.shape == (1, 65, 192)
    assert m.blocks[0].attn.relative_position_bias_table.shape == (15 * 15 + 3, 12)
    assert m.blocks[0].attn.relative_position_index.shape == (65, 65)
    assert isinstance(m.blocks[0].drop_path1, nn.Identity)  # stochastic depth 0 -> 0.2 linearly
    assert m.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    assert m.blocks[2].drop_path2.drop_prob == pytest.approx(0.2)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(Exception):  # the patch embedding refuses another input size, as the original's
        m(torch.randn(1, 3, 64, 64))


# ----- relative position index ---------------------------------------------------------------------------------
def test_index_table_14x14_by_hand(tiny_rpe):
    attn = tiny_rpe.blocks[0].attn
    idx = attn.relative_position_index
    assert idx.shape == (197, 197) and idx.dtype == torch.long
    assert attn.relative_position_bias_table.shape == (732, 12)  # 27*27 + 3
    assert idx[0, 0] == 731
    assert (idx[0, 1:] == 729).all() and (idx[1:, 0] == 730).all()
    assert idx[tok(0, 0), tok(0, 1)] == 363  # dh 0, dw -1: 13*27 + 12
    assert idx[tok(0, 1), tok(0, 0)] == 365  # dw +1
    assert idx[tok(1, 0), tok(0, 0)] == 391  # dh +1: 14*27 + 13
    assert idx[tok(13, 13), tok(0, 0)] == 728  # 26*27 + 26
    assert idx[tok(0, 0), tok(13, 13)] == 0
    assert idx[tok(0, 13), tok(13, 0)] == 26  # dh -13, dw +13: 0*27 + 26
    assert idx[tok(2, 5), tok(7, 1)] == 233  # dh -5, dw +4: 8*27 + 17
    assert (idx.diagonal()[1:] == 364).all()  # same patch: 13*27 + 13
    patches = idx[1:, 1:]
    assert (patches + patches.T == 2 * 364).all()  # opposite offsets
    assert patches.max() == 728 and patches.min() == 0
    assert torch.equal(patches.unique(), torch.arange(729))  # every offset of a 14x14 grid occurs
    # The same offset gives the same entry wherever the pair sits.
    assert idx[tok(3, 4), tok(5, 9)] == idx[tok(8, 7), tok(10, 12)] == (11 * 27 + 8)
    # Every block owns its own table and an identical index.
    assert all(torch.equal(b.attn.relative_position_index, idx) for b in tiny_rpe.blocks)
    assert len({b.attn.relative_position_bias_table.data_ptr() for b in tiny_rpe.blocks}) == 12


def test_index_table_non_square_grid_written_out():
    """2 rows x 3 columns of patches (img 8x12, patch 4): table (3*5)+3 = 18 rows."""
    m = VisionTransformerRPE(img_size=(8, 12), patch_size=4, embed_dim=24, depth=1, num_heads=3, num_classes=2)
    expected = torch.tensor([
        [17, 15, 15, 15, 15, 15, 15],
        [16, 7, 6, 5, 2, 1, 0],
        [16, 8, 7, 6, 3, 2, 1],
        [16, 9, 8, 7, 4, 3, 2],
        [16, 12, 11, 10, 7, 6, 5],
        [16, 13, 12, 11, 8, 7, 6],
        [16, 14, 13, 12, 9, 8, 7],
    ])
    assert m.blocks[0].attn.relative_position_bias_table.shape == (18, 3)
    assert torch.equal(m.blocks[0].attn.relative_position_index, expected)
    assert torch.equal(hand_index(2, 3), expected)  # the test's own helper agrees with the written-out table
    assert m(torch.randn(1, 3, 8, 12)).shape == (1, 2)


# ----- keys, sizes, init ----------------------------------------------------------------------------------------
def test_state_dict_keys_and_shapes(tiny_rpe):
    d = 192
    expected = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d),
                "patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,),
                "fc_norm.weight": (d,), "fc_norm.bias": (d,), "head.weight": (1000, d), "head.bias": (1000,)}
    shapes = {"gamma_1": (d,), "gamma_2": (d,), "norm1.weight": (d,), "norm1.bias": (d,),
              "attn.q_bias": (d,), "attn.v_bias": (d,), "attn.qkv.weight": (3 * d, d),
              "attn.relative_position_bias_table": (732, 12), "attn.relative_position_index": (197, 197),
              "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
              "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d),
              "mlp.fc2.bias": (d,)}
    assert set(shapes) == set(BLOCK_FIELDS)
    for i in range(12):
        expected.update({f"blocks.{i}.{k}": s for k, s in shapes.items()})
    sd = tiny_rpe.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert not any(k.endswith("attn.qkv.bias") or k.startswith("norm.") for k in sd)
    assert isinstance(tiny_rpe.norm, nn.Identity)
    # the index is a buffer, not a parameter
    assert "blocks.0.attn.relative_position_index" not in dict(tiny_rpe.named_parameters())


def test_parameter_count_by_formula(tiny_rpe):
    n = sum(p.numel() for p in tiny_rpe.parameters())
    assert n == rpe_params()
    # against the plain vit_tiny_patch16 (5,717,416): per block -3d qkv bias, +2d q/v, +2d gammas, +732*12
    assert n == 5_717_416 + 12 * (-3 * 192 + 4 * 192 + 732 * 12) == 5_825_128
    small = VisionTransformerRPE(**SMALL)
    assert sum(p.numel() for p in small.parameters()) == rpe_params(48, 2, 12, 4, 32, 10)


def test_init_facts(tiny_rpe):
    m = tiny_rpe
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    for l, b in enumerate(m.blocks, start=1):
        assert torch.count_nonzero(b.attn.relative_position_bias_table) == 0
        assert (b.gamma_1 == 0.1).all() and (b.gamma_2 == 0.1).all()
        assert torch.count_nonzero(b.attn.q_bias) == 0 and torch.count_nonzero(b.attn.v_bias) == 0
        assert b.attn.qkv.bias is None
        assert torch.count_nonzero(b.attn.proj.bias) == 0 and torch.count_nonzero(b.mlp.fc1.bias) == 0
        assert (b.norm1.weight == 1).all() and torch.count_nonzero(b.norm2.bias) == 0
        # fix_init_weight: proj and fc2 of layer l at 0.02 / sqrt(2l); qkv and fc1 untouched
        assert b.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * l), rel=0.05)
        assert b.mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * l), rel=0.05)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[11].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    ratio = m.blocks[0].attn.proj.weight.std() / m.blocks[11].attn.proj.weight.std()
    assert ratio.item() == pytest.approx(math.sqrt(12), rel=0.05)
    # head: trunc-normal(0.02) x 0.001, bias 0
    assert m.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.05)
    assert m.head.weight.abs().max().item() < 0.001 * 0.2
    assert torch.count_nonzero(m.head.bias) == 0
    # patch conv: trunc-normal(0.02), bias 0 (PyTorch's default would be uniform within +-1/sqrt(768) = 0.036)
    pw = m.patch_embed.proj.weight
    assert pw.std().item() == pytest.approx(0.02, rel=0.05) and pw.abs().max().item() > 0.05
    assert torch.count_nonzero(m.patch_embed.proj.bias) == 0
    assert m.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert (m.fc_norm.weight == 1).all() and torch.count_nonzero(m.fc_norm.bias) == 0


# ----- checkpoints ---------------------------------------------------------------------------------------------
def test_released_rpe_checkpoint_loads_strictly(tiny_rpe):
    """`mae_tiny_400e_ft_rpe_1000e.pth.tar` layout: `module.model.*` keys, the index buffer included."""
    sd = {"module.model." + k: (torch.randn_like(v) if v.is_floating_point() else v.clone())
          for k, v in tiny_rpe.state_dict().items()}
    net = network_state({"model": sd, "optimizer": {}, "start_epoch": 1000}, "model")
    fresh = copy.deepcopy(tiny_rpe)
    fresh.load_state_dict(net, strict=True)
    for key in ("blocks.11.attn.relative_position_bias_table", "blocks.3.attn.q_bias", "blocks.0.gamma_2",
                "blocks.5.attn.qkv.weight", "head.weight"):
        assert torch.equal(fresh.state_dict()[key], sd["module.model." + key])


def test_mae_checkpoint_into_rpe_loads_what_the_original_loads():
    """§3.6: the MAE `attn.qkv.bias` does not match by name; q/v biases, tables, gammas, fc_norm, head stay."""
    torch.manual_seed(0)
    mae = timm.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=4, depth=2)
    rpe = timm.create_model("vit_tiny_patch16_rpe", img_size=32, patch_size=4, depth=2, use_abs_pos_emb=True)
    init = copy.deepcopy(rpe.state_dict())
    msd = {k: v + 0.01 if k.endswith("qkv.weight") else v for k, v in mae.state_dict().items()}
    report = load_pretrained(rpe, {"model": {"model." + k: v for k, v in msd.items()}})

    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    loaded = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    loaded += [f"blocks.{i}.{k}" for i in range(2) for k in block]
    left = ["gamma_1", "gamma_2", "attn.q_bias", "attn.v_bias", "attn.relative_position_bias_table",
            "attn.relative_position_index"]
    missing = [f"blocks.{i}.{k}" for i in range(2) for k in left]
    missing += ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
    skipped = ["blocks.0.attn.qkv.bias", "blocks.1.attn.qkv.bias", "norm.weight", "norm.bias", "mask_token"]
    skipped += [k for k in msd if k.startswith("decoder")]
    assert sorted(report.loaded) == sorted(loaded)
    assert sorted(report.missing) == sorted(missing)
    assert sorted(report.skipped) == sorted(skipped)
    assert report.resized == []
    sd = rpe.state_dict()
    for k in loaded:
        assert torch.equal(sd[k], msd[k]), k
    for k in missing:
        assert torch.equal(sd[k], init[k]), k
    assert torch.count_nonzero(sd["blocks.1.attn.q_bias"]) == 0 and (sd["blocks.0.gamma_1"] == 0.1).all()
    # the fixed sin-cos table of MAE becomes the learnable pos_embed
    assert rpe.pos_embed.requires_grad and torch.equal(rpe.pos_embed.detach(), mae.pos_embed.detach())


# ----- attention maths -----------------------------------------------------------------------------------------
def test_captured_logits_equal_hand_computation_with_bias():
    torch.manual_seed(0)
    model = VisionTransformerRPE(**SMALL).eval()
    randomize_(model, seed=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with capture_attention(model, [0]) as caught:
            model(x)
        assert set(caught) == {0} and caught[0].shape == (2, 12, 65, 65)
        t = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], 1) + model.pos_embed
        expected, _ = hand_logits(model.blocks[0], t, (8, 8), 12)
        torch.testing.assert_close(caught[0], expected, atol=1e-5, rtol=1e-5)
        # The bias is really in there: without it the logits differ by the gathered table.
        no_bias = expected - model.blocks[0].attn.relative_position_bias_table[hand_index(8, 8)].permute(2, 0, 1)
        assert (caught[0] - no_bias).abs().max() > 0.5
        # One entry by hand: head 5, query patch (1,2) = token 11, key cls -> table row 15*15+3-2 = 226.
        b = model.blocks[0].attn.relative_position_bias_table
        assert (caught[0][:, 5, 11, 0] - no_bias[:, 5, 11, 0]).allclose(b[226, 5].expand(2), atol=1e-6)
    assert all(len(blk.attn._forward_pre_hooks) == 0 for blk in model.blocks)


@pytest.mark.parametrize("cfg,grid", [(SMALL, (8, 8)), (LONG, (12, 12))])
def test_block_by_hand_and_sdpa_equals_explicit(cfg, grid, monkeypatch):
    torch.manual_seed(0)
    model = VisionTransformerRPE(**cfg).eval()
    randomize_(model, seed=4)
    n = grid[0] * grid[1] + 1
    t = torch.randn(2, n, 48)
    img = torch.randn(2, 3, cfg["img_size"], cfg["img_size"])
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(kw.get("attn_mask") is not None)
        return sdpa(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        plain_blk, plain_out = model.blocks[0](t), model(img)
        plain_calls = len(calls)
        with capture_attention(model) as caught:
            hooked_blk, hooked_out = model.blocks[0](t), model(img)
        assert len(calls) == 2 * plain_calls  # hooked blocks keep timm's fused attention
        assert set(caught) == {0, 1}
        expected = hand_block(model.blocks[0], t, grid, 12)
    # SDPA with the relative position bias as its mask, at every length
    assert plain_calls == 3 and all(calls)
    torch.testing.assert_close(plain_blk, hooked_blk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_out, hooked_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked_blk, expected, atol=1e-5, rtol=1e-5)


def test_table_gradients_agree_on_both_paths():
    torch.manual_seed(0)
    model = VisionTransformerRPE(**LONG).train()
    randomize_(model, seed=5)
    img = torch.randn(2, 3, 48, 48)
    model(img).square().sum().backward()
    g_sdpa = [b.attn.relative_position_bias_table.grad.clone() for b in model.blocks]
    model.zero_grad()
    with capture_attention(model):
        model(img).square().sum().backward()
    for b, g in zip(model.blocks, g_sdpa):
        assert g.abs().max() > 0
        torch.testing.assert_close(b.attn.relative_position_bias_table.grad, g, atol=1e-5, rtol=1e-4)


def test_head_pooling_and_token_variant():
    torch.manual_seed(0)
    model = VisionTransformerRPE(**SMALL).eval()
    randomize_(model, seed=6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 65, 48)
        pooled = layer_norm(feats[:, 1:].mean(1), model.fc_norm.weight, model.fc_norm.bias)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled)
        torch.testing.assert_close(model(x), pooled @ model.head.weight.T + model.head.bias)
    cls_pool = VisionTransformerRPE(**SMALL, global_pool=False)
    keys = set(cls_pool.state_dict())
    assert {"norm.weight", "norm.bias"} <= keys and not any(k.startswith("fc_norm") for k in keys)
    assert cls_pool(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    bare = VisionTransformerRPE(**SMALL, init_values=None, use_abs_pos_emb=False)
    keys = set(bare.state_dict())
    assert "pos_embed" not in keys and not any("gamma" in k for k in keys)
