"""Undecodable images (data/bad_images.py): skipped with one warning each and counted in training, the run stopped
past max_bad_images, an error naming the file in evaluation; never a decoder traceback."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mae_lite.data.bad_images import BadImage, load
from mae_lite.data.demo import DEMO_DIR
from mae_lite.data.transforms import pretrain_transform
from mae_lite.engine.dist import DistEnv
from mae_lite.errors import UserError

CPU = torch.device("cpu")
REFUSED = ("truncated.JPEG", "empty.JPEG", "text.JPEG")  # what PIL refuses
DECODED = ("gray16.png", "cmyk.JPEG")  # what PIL decodes (16-bit clipped to 8 bits, CMYK converted), as before


def make_tree(root, good: int = 6):
    """Two classes of good JPEGs, plus the hand-made bad files in class b."""
    photo = Image.open(DEMO_DIR / "chelsea.jpg").convert("RGB").resize((48, 40))
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(good):
            photo.save(root / c / f"x{i}.JPEG", quality=90)  # sorted after the bad files
    photo.save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "full.jpg").unlink()
    (root / "b" / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (root / "b" / "empty.JPEG").write_bytes(b"")
    (root / "b" / "text.JPEG").write_text("this is not an image\n")
    Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)).save(root / "b" / "gray16.png")
    photo.convert("CMYK").save(root / "b" / "cmyk.JPEG")
    return root


def test_which_files_pil_refuses(tmp_path):
    root = make_tree(tmp_path / "d", good=1)
    tf = pretrain_transform(16, output="uint8")
    for name in REFUSED:
        item = load(root / "b" / name, tf, str(root / "b" / name))
        assert isinstance(item, BadImage) and item.path.endswith(name) and item.reason, name
    assert "truncated" in load(root / "b" / "truncated.JPEG", tf, "t").reason
    for name in DECODED:
        x = load(root / "b" / name, tf, name)
        assert isinstance(x, torch.Tensor) and x.shape == (3, 16, 16) and x.dtype == torch.uint8, name


def _recipe(root, **kw):
    from mae_lite.recipes.mae_lite import MaeLite

    return MaeLite(dataset=f"folder:{root}", img_size=16, patch_size=8, num_workers=0, **kw)


def _epoch(recipe, ds, workers=2, batch=4):
    """One pass over `ds` as the loop feeds it: the recipe's collate in the workers, device_batch in this process."""
    sizes = []
    for b in DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=recipe.collate_fn()):
        images, target = recipe.device_batch(b, CPU)
        assert images.dtype == torch.float32 and len(target) == len(images)
        sizes.append(len(images))
    return sizes


def test_training_skips_counts_and_warns_once(tmp_path, caplog):
    root = make_tree(tmp_path / "d")
    r = _recipe(root)
    ds = r.build_datasets()["train"]
    assert len(ds) == 17 and r.bad_images.limit == 10  # the default: 0.1 % of 17, at least 10
    with caplog.at_level(logging.WARNING, logger="mae_lite"):
        sizes = _epoch(r, ds)  # 2 loader workers
        report = r.data_report(DistEnv())
        _epoch(r, ds)
        report2 = r.data_report(DistEnv())
    assert sizes == [4, 4, 4, 4, 1]  # batch sizes kept: bad slots hold copies of good images
    assert report["bad_images"] == 3 and report["bad_images_total"] == 3
    assert sorted(p.rsplit("/", 1)[1] for p in report["bad_image_files"]) == sorted(REFUSED)
    assert report2["bad_images"] == 3 and report2["bad_images_total"] == 3  # the same files again: not new
    warnings = [rec.getMessage() for rec in caplog.records if "cannot be decoded" in rec.getMessage()]
    assert len(warnings) == 3 and all(any(n in w for n in REFUSED) for w in warnings)  # one per file, per run


def test_training_stops_past_max_bad_images(tmp_path):
    root = make_tree(tmp_path / "d")
    r = _recipe(root, max_bad_images=2)
    ds = r.build_datasets()["train"]
    with pytest.raises(UserError) as e:
        _epoch(r, ds, workers=0)
    msg = str(e.value)
    assert "\n" not in msg and "more than max_bad_images=2" in msg and "empty.JPEG" in msg and "max_bad_images=N" in msg


def test_resume_continues_the_runs_count_and_limit(tmp_path):
    """--resume hands the checkpoint's `data` report back to the recipe: the run-wide count and the limit go on."""
    root = make_tree(tmp_path / "d")
    first = _recipe(root, max_bad_images=4)
    ds = first.build_datasets()["train"]
    _epoch(first, ds, workers=0)
    saved = first.data_report(DistEnv())  # what the loop stores under `data` in the checkpoint
    resumed = _recipe(root, max_bad_images=4)
    resumed.restore_data_report(saved)
    assert resumed.data_report(DistEnv())["bad_images_total"] == 3  # not 0: the files of before the restart
    (root / "a" / "late.JPEG").write_bytes(b"")
    (root / "a" / "later.JPEG").write_bytes(b"")  # 3 + 2 new > 4: the limit counts the files of before the restart
    with pytest.raises(UserError, match="more than max_bad_images=4"):
        _epoch(resumed, resumed.build_datasets()["train"], workers=0)


def test_a_batch_of_only_bad_images_stops_with_one_line(tmp_path):
    root = make_tree(tmp_path / "d", good=0)
    (root / "a" / "x.JPEG").write_bytes(b"")
    r = _recipe(root, max_bad_images=100)
    ds = r.build_datasets()["train"]
    with pytest.raises(UserError, match="no image of a training batch could be decoded"):
        _epoch(r, ds, workers=0, batch=1)


def test_bad_image_in_evaluation_is_an_error_naming_it(tmp_path):
    from mae_lite.engine.evaluate import evaluate
    from mae_lite.recipes.finetune import Finetune

    root = tmp_path / "d"
    make_tree(root / "val")
    make_tree(root / "train", good=1)
    r = Finetune(pretrain_exp_name="p", dataset=f"folder:{root}", img_size=16, patch_size=8, depth=1, num_classes=2)
    ds = r.build_eval_dataset()
    loader = DataLoader(ds, batch_size=4, collate_fn=r.collate_fn(), num_workers=2)
    with pytest.raises(UserError) as e:
        evaluate(r.build_network(), loader, DistEnv(), prepare=r.eval_batch)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("evaluation image ") and "cannot be decoded" in msg
    assert any(f"{root}/val/b/{n}" in msg for n in REFUSED)
