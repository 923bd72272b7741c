"""COCO detection transfer (fact sheet 4.12): ViTDet backbone pieces, pyramid, weight loading, detectron2
converter, large-scale jitter, COCO metrics, and a tiny COCO-format run through ssl_train and ssl_eval."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw

from mae_lite.cli.eval import main as ssl_eval
from mae_lite.cli.to_detectron2 import main as ssl_to_detectron2
from mae_lite.cli.train import main as ssl_train
from mae_lite.data.coco import CocoDetection, LargeScaleJitter, collate_detection
from mae_lite.engine.checkpoint import load_checkpoint, save_checkpoint
from mae_lite.engine.schedule import WarmupMultiStep
from mae_lite.errors import UserError
from mae_lite.models.vitdet import (SimpleFeaturePyramid, ViTDetBackbone, WindowBlock, decomposed_rel_pos,
                                    window_partition, window_unpartition)
from mae_lite.recipes import resolve_recipe
from mae_lite.recipes.detection import MaskRCNNViTDet, coco_metrics, coco_results

# 64-px images, a 2-block backbone (block 1 global), 2x2 windows, 16-channel pyramid, 2 categories
TINY = ["img_size=64", "depth=2", "window_size=2", "global_blocks=(1,)", "fpn_dim=16", "box_batch_size_per_image=32",
        "num_classes=2", "num_workers=0", "print_interval=1"]
CATS = [3, 7]  # COCO ids with a gap: labels 1, 2


def _write_split(root: Path, folder: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        w, h = 64, 48
        img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        x0, y0 = int(rng.integers(2, 20)), int(rng.integers(2, 14))
        rect = [x0, y0, x0 + 24, y0, x0 + 24, y0 + 20, x0, y0 + 20]  # category 3: a red rectangle
        tri = [40, 40, 60, 40, 50, 24]  # category 7: a green triangle
        draw.polygon(rect, fill=(220, 30, 30))
        draw.polygon(tri, fill=(30, 220, 30))
        img.save(root / folder / f"{i:04d}.png")
        images.append({"id": seed * 100 + i, "file_name": f"{i:04d}.png", "width": w, "height": h})
        for cat, poly in ((3, rect), (7, tri)):
            xs, ys = poly[0::2], poly[1::2]
            anns.append({"id": len(anns) + 1 + seed * 1000, "image_id": seed * 100 + i, "category_id": cat,
                         "segmentation": [[float(v) for v in poly]], "iscrowd": 0,
                         "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                         "area": float((max(xs) - min(xs)) * (max(ys) - min(ys)))})
    cats = [{"id": c, "name": f"c{c}", "supercategory": "shape"} for c in CATS]
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": cats}))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _write_split(root / "coco", "train2017", 4, seed=1)
    _write_split(root / "coco", "val2017", 2, seed=2)
    return root


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    """A pre-trained-format ViT-Tiny (2 blocks) checkpoint: {"model": {"model.<key>"}} plus MAE decoder keys."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16", depth=2)
    state = {f"model.{k}": v for k, v in vit.state_dict().items()}
    state["model.decoder_embed.weight"] = torch.zeros(3, 3)
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.pth.tar"
    save_checkpoint({"model": state}, path)
    return path, vit.state_dict()


# ----- backbone pieces ---------------------------------------------------------------------------
def test_window_partition_and_unpartition_are_inverse_with_padding():
    x = torch.randn(2, 5, 7, 3)
    windows, padded = window_partition(x, 3)
    assert padded == (6, 9) and windows.shape == (2 * 2 * 3, 3, 3, 3)
    assert torch.equal(windows[0], x[0, :3, :3])  # first window: top-left corner
    assert torch.equal(windows[5, 2], torch.zeros(3, 3))  # last window of image 0: its bottom row is padding
    assert torch.equal(window_unpartition(windows, 3, padded, (5, 7)), x)
    no_pad, hw = window_partition(x[:, :3, :6], 3)
    assert hw == (3, 6) and torch.equal(window_unpartition(no_pad, 3, hw, (3, 6)), x[:, :3, :6])


def test_decomposed_rel_pos_matches_its_definition():
    torch.manual_seed(0)
    H, W, d = 3, 4, 5
    q = torch.randn(1, 2, H * W, d)
    th, tw = torch.randn(2 * H - 1, d), torch.randn(2 * W - 1, d)
    bias = decomposed_rel_pos(q, th, tw, (H, W), (H, W))
    for i in range(H * W):
        for j in range(H * W):
            (qi, qj), (ki, kj) = divmod(i, W), divmod(j, W)
            want = q[0, 1, i] @ th[qi - ki + H - 1] + q[0, 1, i] @ tw[qj - kj + W - 1]
            assert bias[0, 1, i, j] == pytest.approx(want.item(), abs=1e-5)


def test_a_window_as_large_as_the_grid_is_global_attention():
    torch.manual_seed(0)
    win = WindowBlock(24, 3, grid=(11, 11), window=11)  # 121 tokens: the SDPA path on the CPU too
    glob = WindowBlock(24, 3, grid=(11, 11), window=0)
    torch.nn.init.normal_(win.attn.rel_pos_h)
    torch.nn.init.normal_(win.attn.rel_pos_w)
    glob.load_state_dict(win.state_dict())  # same tables: an 11 x 11 window and an 11 x 11 grid have 21 offsets
    x = torch.randn(2, 11, 11, 24)
    assert torch.allclose(win(x), glob(x), atol=1e-6)
    win(x).sum().backward()
    assert win.attn.rel_pos_h.grad.abs().sum() > 0  # the relative-position tables learn


def test_pos_embed_interpolation_keeps_a_constant_embedding_constant():
    net = ViTDetBackbone(img_size=640, depth=1)
    assert net.pos_embed.shape == (1, 1 + 14 * 14, 192)  # the pre-training table, cls position included
    with torch.no_grad():
        net.pos_embed.fill_(0.7)
        net.pos_embed[:, 0] = 99.0  # the cls position is not used
    table = net.abs_pos((40, 40))
    assert table.shape == (1, 40, 40, 192)
    assert torch.allclose(table, torch.full_like(table, 0.7), atol=1e-6)


def test_pyramid_strides_and_shapes_at_640():
    net = ViTDetBackbone(img_size=640, depth=1)  # block 0 is windowed: 40 x 40 padded to 3 x 3 windows of 14
    sfp = SimpleFeaturePyramid(net, out_channels=16)
    assert sfp.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "pool": 64}
    with torch.no_grad():
        out = sfp(torch.randn(1, 3, 640, 640))
    assert list(out) == ["p2", "p3", "p4", "p5", "pool"]
    for name, feat in out.items():
        assert feat.shape == (1, 16, 640 // sfp.strides[name], 640 // sfp.strides[name])


def test_full_recipe_model_matches_the_original_config():
    r = MaskRCNNViTDet()
    assert (r.img_size, r.batch_size, r.max_epoch, r.lr, r.opt_betas, r.weight_decay) == (640, 64, 100, 1e-4, (0.9, 0.999), 0.05)
    assert (r.window_size, r.global_blocks, r.drop_path, r.warmup_iters, r.scale_range) == (14, (2, 5, 8, 11), 0.0, 250, (0.1, 2.0))
    assert resolve_recipe("mask_rcnn_vitdet_t_100ep.py") is MaskRCNNViTDet
    model = r.build_network()
    net = model.backbone.net
    assert [b.window_size for b in net.blocks] == [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]
    assert net.blocks[0].attn.rel_pos_h.shape == (27, 16) and net.blocks[2].attn.rel_pos_h.shape == (79, 16)
    assert len(model.rpn.head.conv) == 2  # 2-conv RPN head
    convs = [m for m in model.roi_heads.box_head.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in model.roi_heads.box_head.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.roi_heads.box_head.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert (len(convs), len(fcs), len(norms)) == (4, 1, 4)  # 4conv1fc with LayerNorm
    assert model.roi_heads.box_predictor.cls_score.out_features == 81


# ----- schedule and optimiser ------------------------------------------------------------------------
def test_warmup_multistep_values_by_hand():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupMultiStep(opt, 1e-4, total_steps=270, milestones=[240, 260], warmup_steps=10, warmup_factor=0.001)
    expect = {0: 1e-7, 5: 1e-4 * (0.001 + 0.999 * 0.5), 10: 1e-4, 239: 1e-4, 240: 1e-5, 259: 1e-5, 260: 1e-6}
    for t, lr in expect.items():
        s.step(t)
        assert s.lrs()[0] == pytest.approx(lr)
    assert s.state_dict() == {"last_count": 260}
    full = MaskRCNNViTDet().build_schedule(opt, iters_per_epoch=1000)  # 100 000 iterations
    assert full.milestones == [88888, 96296] and full.warmup_steps == 250


def test_no_weight_decay_on_norms_and_pos_embed_only():
    r = MaskRCNNViTDet(**dict(t.split("=") for t in TINY))
    opt = r.build_optimizer(r.build_model())
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert wd["model.backbone.net.pos_embed"] == 0 and wd["model.backbone.net.blocks.0.norm1.weight"] == 0
    assert wd["model.backbone.stages.p2.1.weight"] == 0  # the pyramid's LayerNorm
    assert wd["model.roi_heads.box_head.0.1.weight"] == 0  # the box head's LayerNorm
    assert wd["model.backbone.net.blocks.0.attn.qkv.bias"] == 0.05  # detectron2 decays biases
    assert wd["model.backbone.net.blocks.0.attn.rel_pos_h"] == 0.05
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["betas"] == (0.9, 0.999)


# ----- weights ---------------------------------------------------------------------------------------
def test_pretrained_vit_tiny_loads_every_block_weight(vit_ckpt):
    path, vit_state = vit_ckpt
    r = MaskRCNNViTDet(**dict(t.split("=") for t in TINY))
    method = r.build_model()
    summary = r.load_initial_weights(method, str(path))
    net = method.model.backbone.net
    own = net.state_dict()
    for key, value in vit_state.items():
        if key.startswith(("blocks.", "patch_embed.")) or key == "pos_embed":
            assert torch.equal(own[key], value), key
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in own.items() if "rel_pos" in k)
    assert "left at init 4 (blocks.0.attn.rel_pos_h" in summary  # only the 2 x 2 relative-position tables


def test_moco_and_original_prefixes_load(vit_ckpt, tmp_path):
    _, vit_state = vit_ckpt
    path = tmp_path / "moco.pth.tar"
    save_checkpoint({"model": {f"module.base_encoder.{k}": v for k, v in vit_state.items()}}, path)
    r = MaskRCNNViTDet(weights_prefix="base_encoder", **dict(t.split("=") for t in TINY))
    method = r.build_model()
    r.load_initial_weights(method, str(path))
    assert torch.equal(method.model.backbone.net.blocks[1].mlp.fc2.weight, vit_state["blocks.1.mlp.fc2.weight"])
    with pytest.raises(UserError, match="weights_prefix"):
        MaskRCNNViTDet(**dict(t.split("=") for t in TINY)).load_initial_weights(method, str(path))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_detectron2_converter_writes_backbone_net_keys(tmp_path, capsys, suffix):
    torch.manual_seed(0)
    mae = timm.create_model("mae_vit_tiny_patch16", depth=2)
    src = tmp_path / "mae.pth.tar"
    save_checkpoint({"model": {f"module.model.{k}": v for k, v in mae.state_dict().items()}}, src)
    out = tmp_path / f"d2{suffix}"
    assert ssl_to_detectron2([str(src), str(out), "-wp", "module.model."]) == 0
    assert "under 'backbone.net.'" in capsys.readouterr().out
    if suffix == ".pth":
        weights = torch.load(out, weights_only=True)["model"]
    else:
        with open(out, "rb") as f:
            weights = {k: torch.from_numpy(v) for k, v in pickle.load(f)["model"].items()}
    ours = ViTDetBackbone(depth=2).state_dict()
    assert set(weights) == {f"backbone.net.{k}" for k in ours if "rel_pos" not in k}
    assert weights["backbone.net.pos_embed"].shape == (1, 197, 192)
    assert torch.equal(weights["backbone.net.blocks.1.attn.qkv.weight"], mae.state_dict()["blocks.1.attn.qkv.weight"])
    assert ssl_to_detectron2([str(src), str(tmp_path / "x.pth"), "-wp", "base_encoder"]) == 2
    assert "base_encoder" in capsys.readouterr().err


# ----- data and metrics ------------------------------------------------------------------------------
def test_missing_coco_file_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(UserError, match="instances_train2017.json"):
        CocoDetection(tmp_path, "train")
    code = ssl_train(["-d", "cpu", "-b", "2", "-e", "1", "-f", "mask_rcnn_vitdet_t_100ep", "--exp-options",
                      f"data_root={tmp_path}", f"output_dir={tmp_path / 'out'}", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "instances_train2017.json" in err


def test_large_scale_jitter_moves_masks_and_boxes_with_the_image():
    image = torch.zeros(3, 32, 64, dtype=torch.uint8)
    image[0, 4:12, 8:24] = 255  # the instance: x 8..24, y 4..12
    poly = [[8.0, 4.0, 24.0, 4.0, 24.0, 12.0, 8.0, 12.0]]
    out, t = LargeScaleJitter(size=64, scale=(1.0, 1.0), hflip=1.0)(image, [poly], [2])  # flip only
    assert out.shape == (3, 32, 64) and torch.equal(out, image.flip(-1).float() / 255)
    assert t["boxes"].tolist() == [[40.0, 4.0, 56.0, 12.0]] and t["labels"].tolist() == [2]
    assert t["masks"][0].sum() == 16 * 8 and torch.equal(t["masks"][0].bool(), out[0] > 0.5)
    torch.manual_seed(0)
    out, t = LargeScaleJitter(size=64, scale=(2.0, 2.0), hflip=0.0)(image, [poly, [[60.0, 28, 63, 28, 63, 31]]], [1, 2])
    assert out.shape == (3, 64, 64)  # 64 x 128 after the 2x resize, then a 64 x 64 crop
    assert t["masks"].shape[1:] == (64, 64) and len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
    for box, mask in zip(t["boxes"], t["masks"]):  # tight boxes of what is left of each mask
        ys, xs = mask.nonzero(as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_ground_truth_as_detections_scores_100_ap(coco_root):
    ds = CocoDetection(coco_root, "eval")
    assert ds.label_to_cat == {1: 3, 2: 7}
    results = []
    for image_id in ds.ids:
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=image_id))
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns])
        masks = torch.stack([torch.from_numpy(ds.coco.annToMask(a)).float() for a in anns])[:, None]
        out = {"boxes": boxes, "scores": torch.ones(len(anns)), "masks": masks,
               "labels": torch.tensor([ds.cat_to_label[a["category_id"]] for a in anns])}
        results += coco_results(out, image_id, ds.label_to_cat)
    metrics = coco_metrics(ds.coco, results, ds.ids)
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    assert math.isnan(metrics["bbox_APl"])  # no large objects in 64-px images
    assert coco_metrics(ds.coco, [], ds.ids)["bbox_AP"] == 0.0


def test_tiny_coco_trains_and_evaluates_end_to_end(coco_root, vit_ckpt, tmp_path, capsys):
    path, _ = vit_ckpt
    images, targets = collate_detection([CocoDetection(coco_root, "train", LargeScaleJitter(64))[i] for i in range(2)])
    assert len(images) == 2 and {"boxes", "labels", "masks", "image_id"} <= set(targets[0])
    opts = [f"data_root={coco_root}", f"output_dir={tmp_path}", "exp_name=det", *TINY]
    assert ssl_train(["-d", "cpu", "-b", "2", "-e", "1", "-f", "mask_rcnn_vitdet_t_100ep", "--ckpt", str(path),
                      "--exp-options", *opts]) == 0
    out = tmp_path / "det"
    ckpt = load_checkpoint(out / "last_epoch_ckpt.pth.tar")
    assert "best_bbox_AP" in ckpt and "best_segm_APl" in ckpt and ckpt["start_epoch"] == 1
    log = "\n".join(p.read_text() for p in out.glob("*.txt")) + "\n".join(p.read_text() for p in out.glob("*.log"))
    for part in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask", "bbox_AP"):
        assert part in log, part
    assert "initial weights from" in log and "loaded 27 tensors" in log
    capsys.readouterr()
    assert ssl_eval(["-d", "cpu", "-b", "2", "-f", "mask_rcnn_vitdet_t_100ep", "--ckpt",
                     str(out / "last_epoch_ckpt.pth.tar"), "--exp-options", *opts]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    for kind, line in zip(("bbox", "segm"), lines):
        assert line.startswith(f"{kind}: AP ")
        values = dict(part.split() for part in line.split(": ", 1)[1].split(" | "))
        assert list(values) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
        assert all(math.isnan(float(v)) or 0 <= float(v) <= 100 for v in values.values())


def test_too_few_classes_for_the_annotations_is_refused(coco_root):
    r = MaskRCNNViTDet(data_root=str(coco_root), num_classes=1)
    with pytest.raises(UserError, match="set num_classes=2"):
        r.build_datasets()


class _GroundTruthDetector(torch.nn.Module):
    """Stands in for the detector in eval mode: returns each image's ground truth as detections."""

    def __init__(self, ds: CocoDetection):
        super().__init__()
        self.ds = ds
        self.calls = 0

    def forward(self, images):
        outs = []
        for _ in images:
            image_id = self.ds.ids[self.order[self.calls]]
            self.calls += 1
            anns = self.ds.coco.loadAnns(self.ds.coco.getAnnIds(imgIds=image_id))
            boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                  for a in anns])
            masks = torch.stack([torch.from_numpy(self.ds.coco.annToMask(a)).float() for a in anns])[:, None]
            outs.append({"boxes": boxes, "scores": torch.ones(len(anns)), "masks": masks,
                         "labels": torch.tensor([self.ds.cat_to_label[a["category_id"]] for a in anns])})
        return outs


def _no_all_gather(*args, **kwargs):
    raise AssertionError("distributed detection evaluation must gather to rank 0 only, not all_gather to every rank")


def _eval_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import os

    from mae_lite.engine.dist import init_process
    from mae_lite.engine.evaluate import eval_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = init_process(rank, world, 0, "cpu")
    torch.distributed.all_gather_object = _no_all_gather  # detections go to rank 0 only (gather_object)
    recipe = MaskRCNNViTDet(data_root=root, img_size=64, num_classes=2)
    ds = recipe.build_datasets()["eval"]
    loader = eval_loader(ds, 1, env, 0, collate_fn=recipe.collate_fn())
    detector = _GroundTruthDetector(ds)
    detector.order = list(loader.sampler)  # this rank's shard: image rank, rank + world, ...
    metrics = recipe.evaluate(detector, loader, env)
    torch.save({"metrics": metrics, "images": detector.calls}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_evaluation_gathers_every_shard(coco_root, tmp_path):
    """Each of 2 processes detects on 1 of the 2 val images; perfect detections score 100 AP only if both
    shards' detections reach pycocotools (one shard alone would miss half the ground truth). The detections are
    gathered to rank 0 only (all_gather_object is refused in the workers); the metrics are broadcast to every rank."""
    from mae_lite.engine.dist import free_port

    torch.multiprocessing.spawn(_eval_worker, args=(2, free_port(), str(coco_root), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert r[0]["images"] == r[1]["images"] == 1
    for part in r:
        assert part["metrics"]["bbox_AP"] == pytest.approx(100.0) and part["metrics"]["segm_AP"] == pytest.approx(100.0)
    assert json.dumps(r[0]["metrics"]) == json.dumps(r[1]["metrics"])  # every rank gets rank 0's numbers (nan too)
