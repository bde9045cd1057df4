"""The GPU truth kit never rots: its --smoke mode (tiny model, CPU, a few steps) runs every part it runs on a GPU —
swiftci and the plain Trainer baseline, lora and full — and reports the parts swiftci does not offer yet as
skipped with a reason."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_the_smoke_mode_measures_every_part_or_says_why_not(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "smoke" and result["model_parameters"] > 0
    for tuner in ("lora", "full"):
        part = result["parts"][f"train_{tuner}"]
        assert part["status"] == "measured", part
        assert part["swiftci_tokens_per_second"] > 0 and part["trainer_tokens_per_second"] > 0
        assert part["ratio"] == round(part["swiftci_tokens_per_second"] / part["trainer_tokens_per_second"], 3)
    others = [p for name, p in result["parts"].items() if not name.startswith("train_")]
    assert others and all(p["status"] in ("measured", "skipped") and p.get("reason") for p in others if
                          p["status"] == "skipped")
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| train_lora (fp32, batch 4) |" in md and "| train_full (fp32, batch 4) |" in md
    assert all(f"| {name} | skipped: " in md for name, p in result["parts"].items() if p["status"] == "skipped")
