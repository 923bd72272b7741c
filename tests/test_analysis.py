"""Analysis tools: attention entropy/distance, layer CKA, kNN, reconstructions, and their console commands."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import timm
import torch

import mae_lite.models  # noqa: F401  (registers the architectures)
from mae_lite.analysis.attention import attention_stats, entropy_and_distance, grid_distances, uniform_reference
from mae_lite.analysis.cka import MinibatchCKA, cka, gram, layer_cka, unbiased_hsic
from mae_lite.analysis.features import catch_layers, pooled_features
from mae_lite.analysis.knn import knn_accuracy, knn_predict, layer_knn_eval
from mae_lite.analysis.reconstruct import grid_columns, reconstruct, save_reconstruction_grid
from mae_lite.cli.knn import main as ssl_knn
from mae_lite.cli.vis_attn import main as ssl_vis_attn
from mae_lite.cli.vis_cka import main as ssl_vis_cka
from mae_lite.cli.vis_recon import main as ssl_vis_recon
from mae_lite.engine.checkpoint import save_checkpoint

TINY = dict(img_size=32, patch_size=8, depth=2)  # a 4 x 4 grid of 8-px patches, 12 heads
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def uniform_attention(net: torch.nn.Module) -> torch.nn.Module:
    """Zero q and k: every logit is 0, so every query attends uniformly."""
    for blk in net.blocks:
        blk.attn.qkv.weight.data.zero_()
        if blk.attn.qkv.bias is not None:
            blk.attn.qkv.bias.data.zero_()
    return net


# ----- attention entropy and distance ---------------------------------------------------------------
def test_grid_distances_by_hand():
    d = grid_distances((2, 3), scale=16)  # patches 0 1 2 / 3 4 5
    assert d.shape == (6, 6) and d[0, 0] == 0
    assert d[0, 1] == 16 and d[0, 3] == 16 and d[0, 5] == pytest.approx(16 * math.sqrt(5))
    assert torch.equal(d, d.T)


def test_uniform_attention_gives_log_n_and_the_mean_grid_distance():
    logits = torch.zeros(3, 2, 4, 4)  # 2 x 2 grid, cls already dropped
    e, d = entropy_and_distance(logits, grid_distances((2, 2), 16))
    # each query: three others at 1, 1 and sqrt(2) grid steps, itself at 0
    assert torch.allclose(d / 3, torch.full((2,), 16 * (2 + math.sqrt(2)) / 4, dtype=torch.float64))
    assert torch.allclose(e / 3, torch.full((2,), -math.log(0.25 + 1e-6), dtype=torch.float64))
    assert -math.log(0.25 + 1e-6) == pytest.approx(math.log(4), abs=1e-5)
    assert uniform_reference((2, 2), 16) == pytest.approx((-math.log(0.25 + 1e-6), 16 * (2 + math.sqrt(2)) / 4))


def test_one_hot_self_attention_gives_distance_zero():
    logits = (torch.eye(9) * 1e4).expand(2, 3, 9, 9)
    e, d = entropy_and_distance(logits, grid_distances((3, 3), 16))
    assert torch.equal(d, torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(e, torch.zeros(3, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("arch", ["vit_tiny_patch16", "vit_tiny_patch16_rpe", "mae_vit_tiny_patch16"])
def test_model_with_uniform_attention_through_the_hook(arch):
    net = uniform_attention(timm.create_model(arch, **TINY))
    loader = [(images(3, 1), torch.zeros(3)), (images(3, 2), torch.zeros(3))]
    ent, dist = attention_stats(net, loader, max_images=5)
    assert ent.shape == dist.shape == (2, 12)  # [depth, heads]
    # 16 patch keys after dropping the cls token (17 would give log 17)
    np.testing.assert_allclose(ent, -math.log(1 / 16 + 1e-6), rtol=1e-9)
    np.testing.assert_allclose(dist, grid_distances((4, 4), 8).mean().item(), rtol=1e-9)  # patch size 8 px
    _, dist14 = attention_stats(net, loader, distance_scale=14)  # the original's factor
    np.testing.assert_allclose(dist14, dist * 14 / 8, rtol=1e-9)


def test_attention_mean_weighs_every_image_equally():
    net = timm.create_model("vit_tiny_patch16", **TINY).eval()
    x = images(5, 3)
    whole = attention_stats(net, [(x, None)])
    split = attention_stats(net, [(x[:1], None), (x[1:], None)])  # batches of 1 and 4
    np.testing.assert_allclose(split[0], whole[0], rtol=1e-10)
    np.testing.assert_allclose(split[1], whole[1], rtol=1e-10)


def test_analyses_run_in_eval_mode_and_give_the_mode_back():
    net = timm.create_model("vit_tiny_patch16", drop_rate=0.5, **TINY).train()  # dropout would change every run
    batches = [(images(4), torch.zeros(4))]
    first, second = attention_stats(net, batches), attention_stats(net, batches)
    np.testing.assert_array_equal(first[0], second[0])
    assert torch.equal(layer_cka(net, net, batches), layer_cka(net, net, batches))
    assert net.training


# ----- CKA ---------------------------------------------------------------------------------------------
def u_statistic_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """HSIC_1 of Song et al. (2012) by its definition: the mean over distinct (i, j, q, r) of the symmetrised
    kernel h = K_tu L_tu + K_tu L_vw - 2 K_tu L_tv over the 24 orderings (t, u, v, w)."""
    n, total, count = k.shape[0], 0.0, 0
    for idx in itertools.permutations(range(n), 4):
        h = sum(k[t, u] * l[t, u] + k[t, u] * l[v, w] - 2 * k[t, u] * l[t, v] for t, u, v, w in itertools.permutations(idx))
        total, count = total + float(h) / 24, count + 1
    return total / count


def test_unbiased_hsic_equals_its_u_statistic_definition():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    assert unbiased_hsic(gram(x), gram(y)).item() == pytest.approx(u_statistic_hsic(x @ x.T, y @ y.T), rel=1e-9)


def test_cka_self_one_and_invariant_to_orthogonal_maps_and_scaling():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(16, 8, generator=g, dtype=torch.float64)) + torch.randn(40, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka(x, 3.7 * x @ q) == pytest.approx(1.0, abs=1e-10)
    base = cka(x, y)
    assert 0.05 < base < 0.95
    assert cka(0.01 * x @ q, y) == pytest.approx(base, abs=1e-10)
    assert cka(x, 5.0 * y) == pytest.approx(base, abs=1e-10)


def test_minibatch_estimate_matches_full_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 30, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(30, 20, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(512, 20, generator=g, dtype=torch.float64)
    acc = MinibatchCKA(1, 1)
    for i in range(0, 512, 64):
        assert acc.update([x[i:i + 64]], [y[i:i + 64]])
    assert acc.update([x[:3]], [y[:3]]) is False  # fewer than 4 images: no unbiased estimate, skipped
    assert acc.batches == 8
    assert acc.result().item() == pytest.approx(cka(x, y), abs=0.02)
    one = MinibatchCKA(1, 1)  # one batch holding everything is the full-batch value
    one.update([x], [y])
    assert one.result().item() == cka(x, y)


def test_layer_representations_are_the_originals():
    net = timm.create_model("vit_tiny_patch16", global_pool=False, **TINY).eval()
    x = images(2)
    with torch.no_grad(), catch_layers(net) as reps:
        tokens = net.forward_features(x)
        embed = torch.cat([net.cls_token.expand(2, -1, -1), net.patch_embed(x)], dim=1) + net.pos_embed
    assert sorted(reps) == [0, 1, 2] and all(r.shape == (2, 16, 192) for r in reps.values())  # cls removed
    torch.testing.assert_close(reps[0], net.blocks[0].norm1(embed)[:, 1:])
    torch.testing.assert_close(reps[2], net.norm(tokens)[:, 1:])
    pooled = timm.create_model("vit_tiny_patch16", global_pool=True, **TINY).eval()
    with torch.no_grad(), catch_layers(pooled) as reps:
        tokens = pooled.forward_features(x)
    torch.testing.assert_close(reps[2], pooled.fc_norm(tokens)[:, 1:])  # fc_norm on every token, as the original


def test_layer_cka_of_a_model_with_itself_has_a_unit_diagonal():
    net = timm.create_model("vit_tiny_patch16", **TINY)
    m = layer_cka(net, net, [(images(6, s), None) for s in range(2)])
    assert m.shape == (3, 3)
    torch.testing.assert_close(torch.diagonal(m), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(m, m.T)


# ----- kNN -----------------------------------------------------------------------------------------------
def test_knn_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_predict(train, labels, torch.tensor([[2.0, 0.0]]), k=2, temperature=0.5, num_classes=2)
    # neighbours: train 0 (cos 1) and train 2 (cos 1/sqrt 2); train 1 (cos 0) is not among the 2
    expected = torch.tensor([[math.exp(1 / 0.5), math.exp(2 ** -0.5 / 0.5)]])
    torch.testing.assert_close(scores, expected)


def test_knn_separable_is_perfect_and_random_labels_are_chance():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g) * 5
    train_y, eval_y = torch.arange(10).repeat(50), torch.arange(10).repeat(20)
    train_x = centres[train_y] + torch.randn(500, 32, generator=g)
    eval_x = centres[eval_y] + torch.randn(200, 32, generator=g)
    assert knn_accuracy(train_x, train_y, eval_x, eval_y)["top1"] == 100.0
    rand_train, rand_eval = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    r = knn_accuracy(rand_train, torch.randint(10, (2000,), generator=g), rand_eval, torch.randint(10, (2000,), generator=g))
    assert abs(r["top1"] - 10.0) < 2.5 and abs(r["top5"] - 50.0) < 5.0  # 3.7 and 3.3 standard errors


def test_pooled_features_follow_the_network_pooling():
    x = images(2)
    cls = timm.create_model("vit_tiny_patch16", global_pool=False, **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(cls, x), cls.forward_features(x)[:, 0])  # timm: features end with norm
        avg = timm.create_model("vit_tiny_patch16", global_pool=True, **TINY).eval()
        torch.testing.assert_close(pooled_features(avg, x), avg.fc_norm(avg.forward_features(x)[:, 1:].mean(1)))


# ----- reconstructions -------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_of_a_decoder_returning_the_target_is_the_original(norm_pix):
    torch.manual_seed(0)
    model = timm.create_model("mae_vit_tiny_patch16", norm_pix_loss=norm_pix, **TINY)
    x = images(3).clamp(-2, 2)
    model.forward_decoder = lambda latent, ids_restore: model.target(x)  # a perfect decoder
    masked, recon, pasted, mask_img = reconstruct(model, x, mask_ratio=0.75, seed=3)
    torch.testing.assert_close(recon, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(pasted, x, atol=1e-5, rtol=0)
    assert mask_img[:, 0].mean().item() == pytest.approx(0.75)  # 12 of 16 patches hidden
    torch.testing.assert_close(masked, x * (1 - mask_img))
    cols = dict(grid_columns(model, x, MEAN, STD, 0.75, seed=3))
    torch.testing.assert_close(cols["reconstruction"], cols["original"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cols["reconstruction + visible"], cols["original"], atol=1e-5, rtol=0)
    assert reconstruct(model, x, 0.75, seed=3)[3].equal(mask_img) and not reconstruct(model, x, 0.75, seed=4)[3].equal(mask_img)


def test_visible_denormalisation_uses_only_visible_patch_statistics():
    model = timm.create_model("mae_vit_tiny_patch16", norm_pix_loss=True, **TINY)
    x = images(2)
    model.forward_decoder = lambda latent, ids_restore: torch.zeros(2, 16, 192)  # predicts "patch mean" everywhere
    _, recon, _, mask_img = reconstruct(model, x, 0.75, seed=0, denorm="visible")
    patches, mask = model.patchify(x), model.patchify(mask_img)[..., 0]  # mask: 1 = hidden
    visible_means = torch.stack([patches[i][mask[i] == 0].mean(dim=-1).mean() for i in range(2)])
    torch.testing.assert_close(model.patchify(recon), visible_means[:, None, None].expand(2, 16, 192))


def test_save_reconstruction_grid_keeps_its_signature(tmp_path):
    model = timm.create_model("mae_vit_tiny_patch16", norm_pix_loss=True, **TINY)
    path = save_reconstruction_grid(model, images(2), tmp_path / "r.png", MEAN, STD, 0.75)
    assert path.read_bytes()[:4] == b"\x89PNG"


# ----- console commands --------------------------------------------------------------------------------
OPTS = ["dataset=demo", "img_size=32", "patch_size=8", "depth=2", "num_classes=13", "demo_samples=16", "num_workers=0"]


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = timm.create_model("mae_vit_tiny_patch16", norm_pix_loss=True, **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "last_epoch_ckpt.pth.tar"
    save_checkpoint({"model": {f"model.{k}": v for k, v in net.state_dict().items()},
                     "arch": {"name": "mae_vit_tiny_patch16", "kwargs": {"norm_pix_loss": True, **TINY}}}, path)
    return path


def test_ssl_vis_attn_writes_npy_and_box_plots(tmp_path, mae_ckpt, capsys):
    assert ssl_vis_attn(["--device", "cpu", "-b", "4", "-n", "6", "--ckpt", str(mae_ckpt), "--save_name", "MAE (T)",
                         "--exp-options", f"output_dir={tmp_path}", "pretrain_exp_name=mae/run", *OPTS]) == 0
    out = tmp_path / "mae" / "run" / "vis"  # default: under the pre-training run's folder
    arr = np.load(out / "attn_MAE_T.npy")
    assert arr.shape == (2, 2, 12) and (arr[0] > 0).all() and (arr[0] <= math.log(16)).all()
    for png in ("attne_MAE_T.png", "attnd_MAE_T.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "images: 6" in printed and f"wrote {out / 'attnd_MAE_T.png'}" in printed


def test_ssl_vis_cka_writes_matrix_and_heatmap(tmp_path, mae_ckpt, capsys):
    assert ssl_vis_cka(["--device", "cpu", "-b", "4", "-n", "8", "--ckpt1", str(mae_ckpt), "--ckpt2", str(mae_ckpt),
                        "--save_name1", "MAE", "--save_name2", "MAE-cls", "--out", str(tmp_path),
                        "--exp-options", *OPTS, "--exp-options2", "global_pool=False"]) == 0
    m = np.load(tmp_path / "cka_MAE+MAE-cls.npy")
    assert m.shape == (3, 3)
    np.testing.assert_allclose(np.diagonal(m)[:2], 1.0, rtol=1e-9)  # same weights up to the final norm
    assert (tmp_path / "cka_MAE+MAE-cls.png").read_bytes()[:4] == b"\x89PNG"
    assert "model 2: " in capsys.readouterr().out
    assert ssl_vis_cka(["--device", "cpu", "-b", "2", "--exp-options", *OPTS]) == 2
    assert capsys.readouterr().err.strip() == "ssl_vis_cka: error: -b must be >= 4, got 2"


def test_ssl_vis_recon_writes_the_grid_and_refuses_encoder_only(tmp_path, mae_ckpt, capsys):
    opts = ["dataset=demo", "img_size=32", "patch_size=8", "depth=2", "demo_samples=16", "num_workers=0"]
    assert ssl_vis_recon(["--device", "cpu", "--ckpt", str(mae_ckpt), "-n", "2", "--seed", "1", "--out", str(tmp_path),
                          "--exp-options", *opts]) == 0
    png = tmp_path / "recon_mae_mask75_seed1.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in capsys.readouterr().out
    state = torch.load(mae_ckpt, weights_only=True)
    enc = {"model": {k: v for k, v in state["model"].items() if "decoder" not in k}}
    save_checkpoint(enc, tmp_path / "enc.pth")
    assert ssl_vis_recon(["--device", "cpu", "--ckpt", str(tmp_path / "enc.pth"), "--exp-options", *opts]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no decoder weights" in err


def test_ssl_knn_prints_top1_and_writes_json(tmp_path, mae_ckpt, capsys):
    assert ssl_knn(["--device", "cpu", "-b", "8", "--ckpt", str(mae_ckpt), "--out", str(tmp_path),
                    "--exp-options", *OPTS]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "knn_mae.json").read_text())
    assert f"kNN top-1: {result['top1']:.3f}" in printed.splitlines()
    # the demo eval split repeats the train split's 13 photos (same centre crop): every query finds itself
    assert result["top1"] == 100.0 and result["train_images"] == result["eval_images"] == 16


def test_analysis_refuses_a_different_encoder(tmp_path, mae_ckpt, capsys):
    assert ssl_vis_attn(["--device", "cpu", "--ckpt", str(mae_ckpt), "--out", str(tmp_path),
                         "--exp-options", *[o if o != "depth=2" else "depth=3" for o in OPTS]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "depth 2 vs 3" in err


def _two_class_batches(seed: int, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images that are +1 or -1 everywhere (plus noise): separable from the embeddings on."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = (labels * 2 - 1).float()[:, None, None, None] + 0.1 * torch.randn(n, 3, 16, 16, generator=g)
    return [(images[:8], labels[:8]), (images[8:], labels[8:])]


def test_layer_knn_finds_the_layer_where_information_is_destroyed():
    from mae_lite.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=12, global_pool=False)
    with torch.no_grad():
        for blk in vit.blocks:  # every block the identity ...
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        # ... except block 1, which adds a vector so large that fp32 loses the tokens: x + c == c
        vit.blocks[1].mlp.fc2.bias.copy_(1e9 * torch.sign(torch.randn(24)))
    per_layer = layer_knn_eval(vit, _two_class_batches(1), _two_class_batches(2), k=3)
    top1 = [r["top1"] for r in per_layer]
    assert len(top1) == 4  # embeddings (block 0's norm1), blocks 1 and 2's norm1, final norm
    assert top1[0] == 100.0 and top1[1] == 100.0  # before block 1 adds its constant
    assert top1[2] == 50.0 and top1[3] == 50.0  # identical features for every image: one class always wins


def test_ssl_knn_layers_writes_the_curve(tmp_path, capsys):
    assert ssl_knn(["-f", "finetuning", "--device", "cpu", "-b", "16", "-n", "32", "--out", str(tmp_path), "--layers",
                    "--exp-options", "dataset=demo", "img_size=32", "patch_size=4", "depth=2", "num_classes=13",
                    "demo_samples=32", "num_workers=0"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("kNN top-1 per layer"))
    assert len(line.split("embeddings): ")[1].split()) == 3  # depth 2: embeddings, block 1 input, final norm
    data = json.loads((tmp_path / "knn_layers_mae.json").read_text())
    assert len(data["layers"]) == 3 and (tmp_path / "knn_layers_mae.png").read_bytes()[:4] == b"\x89PNG"
