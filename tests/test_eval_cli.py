"""ssl_eval on a tiny generated ImageFolder, against a top-1 counted by hand."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mae_lite.cli.eval import main as ssl_eval
from mae_lite.data.transforms import eval_transform
from mae_lite.engine.checkpoint import save_checkpoint

OPTS = ["img_size=32", "patch_size=4", "depth=2", "num_classes=3", "num_workers=0"]


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b", "c"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            arr = (rng.random((40, 40, 3)) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / name / f"{i}.png")
    return tmp_path / "imgs"


def test_ssl_eval_matches_hand_count_on_original_format(tmp_path, folder, capsys):
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16", img_size=32, patch_size=4, depth=2, num_classes=3)
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    path = tmp_path / "ft.pth.tar"
    save_checkpoint({"model": {f"module.model.{k}": v for k, v in net.state_dict().items()}}, path)  # 8-GPU keys
    code = ssl_eval(["-d", "cpu", "-b", "5", "-f", "finetuning_exp.py", "--ckpt", str(path), "--exp-options",
                     f"dataset=folder:{folder}", *OPTS])
    out = capsys.readouterr().out.strip()
    assert code == 0
    tf = eval_transform(32)
    net.eval()
    hits, n = 0, 0
    for c, name in enumerate(["a", "b", "c"]):
        for f in sorted((folder / name).iterdir()):
            with torch.no_grad():
                hits += int(net(tf(Image.open(f).convert("RGB"))[None]).argmax().item() == c)
            n += 1
    assert out == f"Top1: {100 * hits / n:.3f}, Top5: {100.0:.3f}"  # 3 classes: top-5 always right


def test_ssl_eval_errors_are_one_line(tmp_path, folder, capsys):
    assert ssl_eval(["-d", "cpu", "-f", "finetuning_exp.py", "--ckpt", str(tmp_path / "none.pth")]) == 2
    assert capsys.readouterr().err.strip() == f"ssl_eval: error: checkpoint not found: {tmp_path / 'none.pth'}"
    net = timm.create_model("vit_tiny_patch16", img_size=32, patch_size=4, depth=3, num_classes=3)
    save_checkpoint({"model": {f"model.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "d3.pth")
    assert ssl_eval(["-d", "cpu", "-f", "finetuning_exp.py", "--ckpt", str(tmp_path / "d3.pth"), "--exp-options",
                     f"dataset=folder:{folder}", *OPTS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unexpected" in err and "blocks.2" in err
