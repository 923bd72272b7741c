"""ADE20K semantic segmentation (fact sheet 4.13): mmseg's metrics by hand, slide inference, neck/head shapes,
the warm-up + poly schedule, layer decay, the mmseg converter, and a tiny ADE-layout run through ssl_train,
ssl_eval and a 2-process evaluation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_lite.cli.eval import main as ssl_eval
from mae_lite.cli.to_mmseg import main as ssl_to_mmseg
from mae_lite.cli.train import main as ssl_train
from mae_lite.data.ade20k import ADE20K, SegEvalTransform, collate_segmentation, random_crop, reduce_zero_label, rescale_size
from mae_lite.engine.checkpoint import load_checkpoint, save_checkpoint
from mae_lite.engine.seg_metrics import SegAreas, intersect_and_union, seg_metrics
from mae_lite.errors import UserError
from mae_lite.models.semantic_fpn import FPNHead, Feature2PyramidScale, slide_inference
from mae_lite.recipes import resolve_recipe
from mae_lite.recipes.segmentation import SemanticFPNViT, WarmupPoly

# 32-px crops, patch 8 (4 x 4 tokens), 2 blocks, 6 classes, eval images resized to short side 32
TINY = ["img_size=32", "patch_size=8", "depth=2", "out_indices=(0,0,1,1)", "num_classes=6", "resize_scale=(128,32)",
        "head_channels=8", "iters_per_epoch=2", "warmup_iters=1", "eval_stride=21", "num_workers=0", "print_interval=1"]
TINY_KW = dict(img_size=32, patch_size=8, depth=2, out_indices=(0, 0, 1, 1), num_classes=6, resize_scale=(128, 32),
               head_channels=8, eval_stride=21, num_workers=0)


def _write_split(root: Path, folder: str, sizes: list[tuple[int, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = root / "ade" / "ADEChallengeData2016"
    (base / "images" / folder).mkdir(parents=True)
    (base / "annotations" / folder).mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        label = np.zeros((h, w), np.uint8)  # 0: "other", ignored
        label[: h // 2, : w // 2] = 1
        label[h // 2:, :] = 2 + i % 3
        label[: h // 2, w // 2:] = 6
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[label == 2] = (200, 30, 30)
        Image.fromarray(img).save(base / "images" / folder / f"ADE_{folder}_{i:08d}.jpg", quality=95)
        Image.fromarray(label).save(base / "annotations" / folder / f"ADE_{folder}_{i:08d}.png")


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    _write_split(root, "training", [(40, 56), (48, 48), (36, 64), (44, 40)], seed=0)
    _write_split(root, "validation", [(40, 56), (36, 72), (48, 40)], seed=1)
    return root


# ----- metrics ------------------------------------------------------------------------------------------
def test_miou_by_hand_with_ignored_pixels_and_absent_classes():
    """4 classes; class 3 is in neither labels nor predictions (NaN, left out of the means); 255 is ignored
    even where the prediction is wrong; two images are summed before dividing."""
    label1 = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 255]])
    pred1 = torch.tensor([[0, 1, 1, 0], [1, 2, 0, 2]])
    label2 = torch.tensor([[2, 2], [0, 255]])
    pred2 = torch.tensor([[2, 0], [0, 1]])
    areas = SegAreas(4)
    areas.add(pred1, label1)
    areas.add(pred2, label2)
    # kept pixels: img1 (l,p) = (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); img2 (2,2) (2,0) (0,0)
    inter, pred_area, label_area = [2, 2, 2, 0], [4, 3, 2, 0], [3, 2, 4, 0]
    assert areas.areas.tolist() == [inter, pred_area, label_area]
    summary, per_class = seg_metrics(areas.areas)
    iou = [2 / (4 + 3 - 2), 2 / (3 + 2 - 2), 2 / (2 + 4 - 2)]
    acc = [2 / 3, 2 / 2, 2 / 4]
    assert summary["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert summary["mAcc"] == pytest.approx(100 * sum(acc) / 3)
    assert summary["aAcc"] == pytest.approx(100 * 6 / 9)
    assert per_class["IoU"][:3] == pytest.approx([100 * v for v in iou]) and math.isnan(per_class["IoU"][3])
    # a class predicted but never labelled: IoU 0 (counts in mIoU), Acc NaN
    one = intersect_and_union(torch.tensor([3, 0]), torch.tensor([0, 0]), 4)
    s, pc = seg_metrics(one)
    assert pc["IoU"][3] == 0.0 and math.isnan(pc["Acc"][3]) and s["mIoU"] == pytest.approx(100 * (0.5 + 0.0) / 2)


def test_reduce_zero_label_as_mmseg():
    lab = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    assert reduce_zero_label(lab).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_keep_ratio_rescale_and_cat_max_ratio_crop():
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(256, 341, (2048, 512)) == (512, 682)  # short side 512 (682.0 + 0.5 -> 682)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # the long side caps it
    # one class fills 3/4 of the image: a 2x2 crop qualifies only where it sees two classes, none >= 0.75
    label = np.zeros((4, 4), np.uint8)
    label[:, 2] = 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, crop = random_crop(np.zeros((4, 4, 3), np.uint8), label, 2, 0.75, rng)
        assert sorted(np.unique(crop).tolist()) == [0, 1]


# ----- model --------------------------------------------------------------------------------------------
def test_neck_scales_and_head_output_shape():
    neck = Feature2PyramidScale(192, 0.25)
    maps = [torch.randn(2, 192, 4, 4) for _ in range(4)]
    outs = neck(maps)
    assert [tuple(o.shape) for o in outs] == [(2, 48, 16, 16), (2, 48, 8, 8), (2, 48, 4, 4), (2, 48, 2, 2)]
    head = FPNHead([48] * 4, channels=128, num_classes=150)
    assert [len(h) for h in head.scale_heads] == [1, 2, 4, 6]  # conv stages (+ upsampling) per level: 1, 1, 2, 3
    assert tuple(head(outs).shape) == (2, 150, 16, 16)
    # the full segmentor at 64 px, patch 16: logits at stride 4
    net = SemanticFPNViT(img_size=64, depth=4, out_indices=(0, 1, 2, 3)).build_network().eval()
    assert tuple(net(torch.randn(1, 3, 64, 64)).shape) == (1, 150, 16, 16)
    assert tuple(net.segment(torch.randn(1, 3, 48, 80)).shape) == (1, 150, 48, 80)  # pos_embed resized
    assert isinstance(net.backbone.norm, torch.nn.Identity)  # mmseg's final_norm=False


def test_slide_inference_equals_whole_where_the_window_covers_the_image():
    torch.manual_seed(0)
    net = SemanticFPNViT(**TINY_KW).build_network().eval()
    for h, w in [(32, 32), (24, 32), (16, 24)]:
        x = torch.randn(1, 3, h, w)
        assert torch.allclose(slide_inference(net, x, 32, 21), net.segment(x), atol=1e-6)
    # 32 x 53: two windows (x 0..32 and 21..53), averaged where they overlap
    x = torch.randn(1, 3, 32, 53)
    a, b = net.segment(x[..., :32]), net.segment(x[..., 21:])
    want = torch.zeros(1, 6, 32, 53)
    want[..., :32] += a
    want[..., 21:] += b
    want[..., 21:32] /= 2
    assert torch.allclose(slide_inference(net, x, 32, 21), want, atol=1e-6)


def test_schedule_warmup_then_poly_by_hand():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupPoly(opt, 1e-4, total_steps=10, warmup_steps=4, warmup_factor=1e-6, power=1.0)
    # warm-up: 1e-6 + (1 - 1e-6) t / 3 for t = 0..3 (mmengine's LinearLR over end - begin - 1 steps)
    assert s.value(0) == pytest.approx(1e-10)
    assert s.value(2) == pytest.approx(1e-4 * (1e-6 + (1 - 1e-6) * 2 / 3))
    assert s.value(3) == pytest.approx(1e-4)
    # poly over 10 - 4 - 1 = 5 steps: 1 - (t - 4) / 5
    assert [s.value(t) / 1e-4 for t in range(4, 10)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert s.value(5, scale=0.5) == pytest.approx(0.5 * 0.8e-4)
    # the recipe's own: 1500 warm-up iterations then poly to 160k
    r = SemanticFPNViT()
    full = r.build_schedule(opt, r.iters_per_epoch)
    assert full.total_steps == 160000 and full.value(1499) == pytest.approx(1e-4)
    assert full.value(1500 + 158499 // 2) == pytest.approx(1e-4 * (1 - (158499 // 2) / 158499))


def test_layer_decay_groups_as_mmseg():
    r = SemanticFPNViT(img_size=32, patch_size=8, depth=2, out_indices=(0, 0, 1, 1))
    method = r.build_model()
    opt = r.build_optimizer(method)
    scale = {n: g["lr_scale"] for g in opt.param_groups for n in g["param_names"]}
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert scale["model.backbone.pos_embed"] == pytest.approx(0.8 ** 3)  # embeddings: decay^(depth + 1)
    assert scale["model.backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.8 ** 2)
    assert scale["model.backbone.blocks.1.mlp.fc1.weight"] == pytest.approx(0.8)
    assert scale["model.neck.identity.weight"] == scale["model.head.conv_seg.weight"] == 1.0
    assert wd["model.backbone.pos_embed"] == 0.05 and wd["model.head.conv_seg.bias"] == 0.0
    assert wd["model.neck.upsample_4x.1.weight"] == 0.0  # BatchNorm


# ----- data -----------------------------------------------------------------------------------------
def test_missing_folder_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        SemanticFPNViT(data_root=str(tmp_path)).build_datasets()
    msg = str(e.value)
    assert "\n" not in msg and "ADEChallengeData2016.zip" in msg and "images/training" in msg
    assert ssl_train(["-d", "cpu", "-f", "semantic_fpn_t_160k", "--exp-options", f"data_root={tmp_path}"]) == 2


def test_train_items_are_padded_crops_and_eval_labels_keep_their_size(ade_root):
    r = SemanticFPNViT(data_root=str(ade_root), **TINY_KW)
    ds = r.build_datasets()
    assert len(ds["train"]) == r.iters_per_epoch * r.batch_size
    x, y = ds["train"][0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}
    images, labels = collate_segmentation([ds["eval"][0], ds["eval"][1]])
    assert [tuple(i.shape) for i in images] == [(3, 32, 45), (3, 32, 64)]  # short side 32
    assert [tuple(lb.shape) for lb in labels] == [(40, 56), (36, 72)]
    assert labels[0][0, 0] == 0 and labels[0][-1, 0] == 1 and labels[0][0, -1] == 5  # reduce_zero_label


# ----- end to end -----------------------------------------------------------------------------------
def test_ssl_train_and_ssl_eval_on_a_tiny_ade(ade_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = ssl_train(["-d", "cpu", "-b", "2", "-e", "1", "-f", "semantic_fpn_t_160k", "--exp-options",
                      f"data_root={ade_root}", f"output_dir={out}", *TINY])
    assert code == 0
    ckpt_path = out / "semantic_fpn_t_160k" / "last_epoch_ckpt.pth.tar"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["best_mIoU_epoch"] == 1 and 0.0 <= ckpt["best_mIoU"] <= 100.0
    assert any(k.startswith("model.neck.") for k in ckpt["model"])
    capsys.readouterr()
    assert ssl_eval(["-d", "cpu", "-b", "2", "-f", "semantic_fpn_t_160k.py", "--ckpt", str(ckpt_path),
                     "--exp-options", f"data_root={ade_root}", *TINY]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"mIoU: {ckpt['best_mIoU']:.2f}, mAcc: {ckpt['best_mAcc']:.2f}, "
                                 f"aAcc: {ckpt['best_aAcc']:.2f}")
    assert len(printed) == 1 + 1 + 6  # header and one row per class
    # a pre-training checkpoint (decoder, final norm, 2 x 2 grid) initialises the backbone through the
    # fine-tuning loader: blocks loaded, decoder and norm skipped, the position embedding resized to 4 x 4
    backbone = {k[len("model.backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("model.backbone.")}
    backbone["pos_embed"] = backbone["pos_embed"][:, :5]
    pre = {**backbone, "norm.weight": torch.ones(96), "decoder_embed.weight": torch.zeros(4, 96)}
    vit_ckpt = tmp_path / "vit.pth"
    save_checkpoint({"model": {f"model.{k}": v for k, v in pre.items()}}, vit_ckpt)
    r = resolve_recipe("semantic_fpn_t_160k")(**TINY_KW)
    method = r.build_model()
    line = r.load_initial_weights(method, str(vit_ckpt))
    assert "skipped 2 (" in line and "decoder_embed.weight" in line and "resized pos_embed (1, 5, 192)->(1, 17, 192)" in line
    assert torch.equal(method.model.backbone.blocks[1].mlp.fc2.weight, backbone["blocks.1.mlp.fc2.weight"])
    # with --ema (weights_ema=True) the backbone comes from the checkpoint's model_ema, as fine-tuning's does
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in pre.items()}
    save_checkpoint({"model": {f"model.{k}": v for k, v in pre.items()},
                     "model_ema": {f"model.{k}": v for k, v in ema.items()}}, vit_ckpt)
    r = resolve_recipe("semantic_fpn_t_160k")(**TINY_KW, weights_ema=True)
    method = r.build_model()
    r.load_initial_weights(method, str(vit_ckpt))
    assert torch.equal(method.model.backbone.blocks[1].mlp.fc2.weight, ema["blocks.1.mlp.fc2.weight"])


def _eval_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import os

    from mae_lite.engine.dist import init_process
    from mae_lite.engine.evaluate import eval_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the cores
    env = init_process(rank, world, 0, "cpu")
    torch.manual_seed(0)
    r = SemanticFPNViT(data_root=root, **TINY_KW)
    method = r.build_model()
    loader = eval_loader(r.build_eval_dataset(), 1, env, 0, collate_fn=r.collate_fn())
    areas = r.eval_areas(method, loader, env)
    torch.save({"areas": areas.areas, "n": len(loader.sampler)}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_evaluation_counts_every_pixel_once(ade_root, tmp_path):
    """3 eval images over 2 processes (2 + 1, no padding): the all-reduced areas equal one process's, and the
    labelled-pixel total is the split's."""
    from mae_lite.engine.dist import DistEnv, free_port

    torch.multiprocessing.spawn(_eval_worker, args=(2, free_port(), str(ade_root), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert [p["n"] for p in parts] == [2, 1]
    torch.manual_seed(0)
    r = SemanticFPNViT(data_root=str(ade_root), **TINY_KW)
    method = r.build_model()
    from mae_lite.engine.evaluate import eval_loader

    env = DistEnv(0, 1, 0, torch.device("cpu"))
    single = r.eval_areas(method, eval_loader(r.build_eval_dataset(), 1, env, 0, r.collate_fn()), env).areas
    assert torch.equal(parts[0]["areas"], parts[1]["areas"]) and torch.equal(parts[0]["areas"], single)
    labelled = sum(int((ADE20K(ade_root, "eval", SegEvalTransform((128, 32), r.mean, r.std))[i][1] != 255).sum())
                   for i in range(3))
    assert single[2].sum().item() == labelled


# ----- converter ------------------------------------------------------------------------------------
def test_ssl_to_mmseg_keys_as_beit2mmseg(tmp_path):
    net = SemanticFPNViT(img_size=32, patch_size=8, depth=2, out_indices=(0, 0, 1, 1)).build_network().backbone
    src = tmp_path / "orig.pth.tar"
    save_checkpoint({"model": {f"module.model.{k}": v for k, v in net.state_dict().items()}}, src)
    dst = tmp_path / "mmseg.pth"
    assert ssl_to_mmseg([str(src), str(dst)]) == 0
    keys = set(torch.load(dst, weights_only=True))
    for want in ["cls_token", "pos_embed", "patch_embed.projection.weight", "patch_embed.proj.weight",
                 "layers.0.ln1.weight", "layers.0.ln2.bias", "layers.0.attn.qkv.weight", "layers.0.attn.qkv.bias",
                 "layers.0.attn.proj.weight", "layers.1.ffn.layers.0.0.weight", "layers.1.ffn.layers.1.bias"]:
        assert want in keys, want
    assert not any(k.startswith("blocks.") or ".mlp." in k or ".norm" in k for k in keys)
    assert ssl_to_mmseg([str(src), str(dst), "-wp", "base_encoder"]) == 2


def test_rpe_checkpoint_folds_into_plain_blocks_with_the_same_features(tmp_path):
    """q/v biases and LayerScale of an RPE ViT become qkv.bias and scaled proj/fc2: same block outputs (its
    zero relative-position tables are dropped, as mmseg's MAE backbone drops them)."""
    import timm

    from mae_lite.models.semantic_fpn import vit_feature_maps
    from mae_lite.recipes.segmentation import fold_beit_blocks

    torch.manual_seed(0)
    rpe = timm.create_model("vit_tiny_patch16_rpe", img_size=32, patch_size=8, depth=2, num_classes=0,
                            use_abs_pos_emb=True).eval()
    with torch.no_grad():
        for name, p in rpe.named_parameters():
            if "gamma" in name or "q_bias" in name or "v_bias" in name:
                p.normal_()
    state, dropped = fold_beit_blocks(rpe.state_dict())
    assert len(dropped) == 4 and "blocks.0.attn.qkv.bias" in state and "blocks.1.gamma_2" not in state
    r = SemanticFPNViT(img_size=32, patch_size=8, depth=2, out_indices=(0, 0, 1, 1))
    method = r.build_model().eval()
    path = tmp_path / "rpe.pth"
    save_checkpoint({"model": {f"model.{k}": v for k, v in rpe.state_dict().items()}}, path)
    line = r.load_initial_weights(method, str(path))
    assert "folded" in line
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want, got = vit_feature_maps(rpe, x, (0, 1)), vit_feature_maps(method.model.backbone, x, (0, 1))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got))


class _ScriptedRng:
    """Stands in for numpy's Generator: `integers` and `uniform` return the scripted values in turn."""

    def __init__(self, ints, uniforms):
        self.ints, self.uniforms = list(ints), list(uniforms)

    def integers(self, *args):
        return self.ints.pop(0)

    def uniform(self, *args):
        return self.uniforms.pop(0)


def test_photometric_distortion_steps_as_mmseg():
    from mae_lite.data.ade20k import photometric_distortion

    img = np.array([[[10, 100, 250], [0, 0, 255]]], np.uint8)  # BGR
    # brightness +10 (coin 1), contrast first (mode 1, coin 1, x1.5), no saturation, no hue
    out = photometric_distortion(img, _ScriptedRng([1, 1, 1, 0, 0], [10.0, 1.5]))
    want = np.clip(np.clip(img.astype(np.float32) + 10, 0, 255).astype(np.uint8).astype(np.float32) * 1.5, 0, 255)
    assert out.tolist() == want.astype(np.uint8).tolist()
    # only hue, +90 (OpenCV's uint8 hue is 0..179): pure red becomes cyan
    red = np.array([[[0, 0, 255]]], np.uint8)
    out = photometric_distortion(red, _ScriptedRng([0, 0, 0, 1, 90, 0], []))
    assert out.tolist() == [[[255, 255, 0]]]


@pytest.mark.cuda
def test_full_size_step_and_slide_inference_on_cuda():
    """The recipe's own model at 512 px: an fp16 training step and a sliding-window prediction on the GPU."""
    r = SemanticFPNViT()
    method = r.build_model().cuda()
    opt = r.build_optimizer(method)
    x, y = torch.randn(2, 3, 512, 512, device="cuda"), torch.randint(0, 150, (2, 512, 512), device="cuda")
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss, logs = method(x, y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(loss) and 0 <= logs["acc_seg"] <= 100
    method.eval()
    with torch.autocast("cuda", dtype=torch.float16):
        logits = slide_inference(method.model, torch.randn(1, 3, 512, 683, device="cuda"), 512, r.stride)
    assert logits.shape == (1, 150, 512, 683) and torch.isfinite(logits).all()
