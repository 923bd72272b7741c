"""The optional dependencies (pyproject's extras detection, segmentation, shards, findings): with pycocotools,
OpenCV, webdataset, braceexpand and scikit-learn hidden, the package, every CLI and the test collection work, and
a feature that needs one of them says in one line which extra installs it. One child process does every hidden
check (importing torch there takes seconds)."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from _proc import REPO, cli_env
from mae_lite import _optional
from mae_lite._optional import require
from mae_lite.errors import UserError

HIDDEN = ("pycocotools", "cv2", "webdataset", "braceexpand", "sklearn")

# First thing in the child: every finder answers "no such module" for the hidden names, as when they are not
# installed (find_spec gives None, which torch's own probes expect; import raises ModuleNotFoundError).
HIDE = f"""
import sys
HIDDEN = {HIDDEN!r}

class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""

# Each check's outcome by name: a CLI's (exit status, stderr), or the exception that broke the check.
CHECKS = """
import contextlib, importlib, io, json, pkgutil, traceback
from pathlib import Path

tmp = Path(sys.argv[1])
out = {}

def check(name, fn):
    try:
        out[name] = fn()
    except BaseException as e:
        out[name] = {"exception": traceback.format_exception_only(type(e), e)[-1].strip()}

def cli(module, *argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = importlib.import_module(f"mae_lite.cli.{module}").main(list(argv))
    return {"code": code, "err": err.getvalue()}

def import_all():
    import mae_lite, mae_lite.cli, mae_lite.data, mae_lite.recipes
    return sorted(m.name for m in pkgutil.iter_modules(mae_lite.cli.__path__)
                  if importlib.import_module(f"mae_lite.cli.{m.name}"))

check("import", import_all)
for recipe in ("mae_lite_demo", "finetuning", "mask_rcnn_vitdet_t_100ep", "semantic_fpn_t_160k"):
    check(f"show-config {recipe}", lambda: cli("train", "--show-config", "-f", recipe))
for split in ("train2017", "annotations"):  # the COCO layout, so that only pycocotools is missing
    (tmp / "coco" / split).mkdir(parents=True)
(tmp / "coco" / "annotations" / "instances_train2017.json").write_text("{}")
run, opts = ["-d", "cpu", "-b", "2", "-e", "1"], ["--exp-options", f"data_root={tmp}", f"output_dir={tmp / 'out'}"]
check("detection", lambda: cli("train", *run, "-f", "mask_rcnn_vitdet_t_100ep", *opts))
check("segmentation", lambda: cli("train", *run, "-f", "semantic_fpn_t_160k", *opts))
check("shards", lambda: cli("train", *run, "-f", "mae_lite_demo", *opts, f"dataset=wds:{tmp}"))
check("ssl_prepare", lambda: cli("prepare", "--src", "demo", "--out", str(tmp / "wds"), "--no-progress"))

import pytest
check("collect", lambda: pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(Path.cwd() / "tests")]))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hidden(tmp_path_factory) -> dict:
    proc = subprocess.run([sys.executable, "-c", HIDE + CHECKS, str(tmp_path_factory.mktemp("hidden"))], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"the child failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return dict(json.loads(lines[-1][len("RESULT "):]), collect_output=proc.stdout)


def test_the_package_and_every_cli_import_without_the_optional_packages(hidden):
    assert "train" in hidden["import"] and "prepare" in hidden["import"], hidden["import"]


@pytest.mark.parametrize("recipe", ["mae_lite_demo", "finetuning", "mask_rcnn_vitdet_t_100ep", "semantic_fpn_t_160k"])
def test_show_config_needs_no_optional_package(hidden, recipe):
    assert hidden[f"show-config {recipe}"].get("code") == 0, hidden[f"show-config {recipe}"]


@pytest.mark.parametrize("check, package, extra", [
    ("detection", "pycocotools", "detection"), ("segmentation", "cv2", "segmentation"),
    ("shards", "webdataset", "shards"), ("ssl_prepare", "webdataset", "shards")])
def test_a_feature_without_its_package_names_the_extra_in_one_line(hidden, check, package, extra):
    result = hidden[check]
    assert result.get("code") == 2, result
    err = result["err"].strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"needs {package}, which is not installed: pip install 'mae-lite[{extra}]'" in err, err


def test_the_tests_collect_without_the_optional_packages(hidden):
    output = hidden["collect_output"]
    assert hidden["collect"] == 0 and "ERROR" not in output and " collected" in output, output[-3000:]


def test_require_tells_missing_from_broken(monkeypatch):
    monkeypatch.setitem(sys.modules, "braceexpand", None)  # import raises ModuleNotFoundError: not installed
    with pytest.raises(UserError, match=r"^X needs braceexpand, which is not installed: pip install "
                                        r"'mae-lite\[shards\]' \(or pip install braceexpand==0\.1\.7\)$"):
        require("braceexpand", "X")

    def broken(name, package=None):  # an installed OpenCV without its shared libraries
        if name == "cv2":
            raise ImportError("libGL.so.1: cannot open shared object file:\nNo such file or directory")
        return importlib.import_module(name, package)

    monkeypatch.setattr(_optional, "importlib", SimpleNamespace(import_module=broken))
    with pytest.raises(UserError) as e:
        require("cv2", "Y")
    assert str(e.value) == ("Y needs cv2, which fails to import (libGL.so.1: cannot open shared object file: No such "
                            "file or directory): pip install 'mae-lite[segmentation]' (or pip install "
                            "opencv-python-headless==4.14.0.94)")


def test_the_pins_match_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    for pin, extra in _optional.PACKAGES.values():
        assert f'"{pin}"' in text and f"\n{extra} = [" in text, (pin, extra)
