"""ssl_smoke: the whole workflow on the embedded photos, end to end, in seconds at this size."""
from __future__ import annotations

import json

from mae_lite.cli.smoke import main as ssl_smoke


def test_smoke_runs_every_step_and_the_numbers_connect(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert ssl_smoke(["--out", str(out), "--depth", "1", "--epochs", "1", "--samples", "32", "-b", "16"]) == 0
    rows = json.loads((out / "smoke.json").read_text())
    assert [r["step"].split(" ")[0] for r in rows] == ["pre-train", "fine-tune", "evaluate", "kNN", "linear",
                                                       "attention", "CKA", "reconstructions", "export"]
    results = {r["step"].split(" ")[0]: r["result"] for r in rows}
    # the fine-tuning run's last evaluation and ssl_eval on its checkpoint see the same weights and images
    assert results["fine-tune"].split()[-1] == results["evaluate"].split()[-1]
    assert float(results["CKA"].split()[-1]) >= 0.9  # layer 0 (patch + position embedding) barely moves in 2 epochs
    for path in ["mae/last_epoch_ckpt.pth.tar", "mae/ft_eval/last_epoch_ckpt.pth.tar", "mae/linprobe_eval",
                 "vis/attn_mae.npy", "vis/cka_pretrained+finetuned.npy", "export/model.safetensors", "smoke.md"]:
        assert (out / path).exists(), path
    assert list((out / "vis").glob("recon_*.png"))
    assert "all 9 steps ran" in capsys.readouterr().out


def test_a_failing_step_is_one_line_naming_the_step_and_its_log(tmp_path, capsys):
    assert ssl_smoke(["--out", str(tmp_path), "--depth", "1", "--epochs", "1", "--samples", "32", "-b", "16",
                      "-d", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step 'pre-train (mae_lite)' failed" in err and "logs/01_pre-train.txt" in err
