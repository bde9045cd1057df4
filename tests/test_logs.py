"""Quiet, useful logs: what `swiftci run` writes to a CI log is its own lines only — third-party warnings, banners
and progress bars go to each stage's libraries.log — and every step line says where training stands."""

from __future__ import annotations

import re
import shutil

from conftest import TINY, swiftci, tiny_config, write_config

OURS = re.compile(r"^(==> |step \d+/\d+ |::group::swiftci |::endgroup::|note: |quantizer output: )")
STEP = re.compile(r"^step \d+/4  epoch \d+\.\d\d  loss \S+  lr \S+  grad_norm \S+  elapsed \d+ s  eta (—|\d+ s)$")


def test_a_run_in_ci_logs_only_its_own_lines(tiny_model, tmp_path):
    """Outside a git repository too (lm-eval asks git for a commit and git complains)."""
    shutil.copytree(TINY / "tasks", tmp_path / "tasks")
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(
        tiny_model, tmp_path / "out", train={"max_steps": 4, "logging_steps": 1, "save_steps": 1000},
        evaluate={"tasks": ["tiny_reverse"], "task_dir": str(tmp_path / "tasks"), "limit": 3, "baseline": "none",
                  "gates": []},
        quantize=None, deploy=None))
    proc = swiftci("run", "-c", str(cfg), cwd=tmp_path, env={"GITHUB_ACTIONS": "true"}, check=0)
    lines = proc.stderr.splitlines()
    assert "\r" not in proc.stderr, "no progress bars in a log"
    assert [line for line in lines if not OURS.match(line)] == [], "third-party output reached the log"
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 4 and all(STEP.match(s) for s in steps), steps
    assert "::group::swiftci train" in lines and "::group::swiftci evaluate" in lines
    assert (tmp_path / "out/train/libraries.log").is_file() and (tmp_path / "out/evaluate/libraries.log").is_file()
