"""`swiftci init` in a real pseudo-terminal (pexpect): the questions, arrow keys and defaults; a config that
validates and workflows that actionlint and zizmor accept; Ctrl-C leaves nothing; the flags give the same files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from conftest import TINY, swiftci

BIN = Path(sys.executable).parent
DOWN, CLEAR = "\x1b[B", "\x15"  # arrow down; Ctrl-U clears a prefilled answer
FILES = ("swiftci.yaml", ".github/workflows/swiftci.yml", ".github/workflows/swiftci-pr.yml", ".github/actionlint.yaml", ".github/zizmor.yml")


def model_repo(root: Path, tiny_model: Path) -> Path:
    (root / "data").mkdir(parents=True)
    shutil.copy(TINY / "data/train.jsonl", root / "data/train.jsonl")
    shutil.copytree(tiny_model, root / "base-model")
    return root


def spawn(root: Path) -> pexpect.spawn:
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "40"}
    return pexpect.spawn(str(BIN / "swiftci"), ["init", "--dir", str(root)], env=env, encoding="utf-8",
                         timeout=60, dimensions=(40, 140))


def answer(child: pexpect.spawn, question: str, keys: str) -> None:
    child.expect_exact(question)
    child.send(keys)


def test_interactive_init_writes_a_config_and_workflows_that_check_out(tiny_model, tmp_path):
    root = model_repo(tmp_path / "repo", tiny_model)
    child = spawn(root)
    answer(child, "Run name:", CLEAR + "support-bot\r")
    answer(child, "Base model", CLEAR + "base-model\r")
    answer(child, "Method:", "\r")
    answer(child, "Training data", "\r")  # the default, data/train.jsonl
    child.expect(r"data/train.jsonl: (\d+) rows in the messages format, all readable")
    rows = int(child.match.group(1))
    answer(child, "GPU runner labels", "\r")  # no GPU on this machine: asked, not detected
    answer(child, "GPU type of those runners:", DOWN + "\r")  # A100 80 GB
    answer(child, "Tuner (recommended: full", "\r")  # a tiny model fits in full
    answer(child, "lm-eval tasks", "arc_easy\r")
    answer(child, "Gate", "arc_easy/acc>=0.3\r")
    answer(child, "Quantize", "y")
    answer(child, "Deploy", "n")
    answer(child, "Longest a training may run:", CLEAR + "2h\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert rows == len((root / "data/train.jsonl").read_text().splitlines())
    config = (root / "swiftci.yaml").read_text()
    for line in ("name: support-bot", "id: base-model", "tuner: full", "max_runtime: 2h", "tasks: [arc_easy]",
                 '{metric: "arc_easy/acc", min: 0.3}', "quantize:"):
        assert line in config, line
    assert "deploy:" not in config
    assert "train-timeout-minutes: 150" in (root / ".github/workflows/swiftci.yml").read_text()

    assert swiftci("validate", "-c", str(root / "swiftci.yaml")).returncode == 0
    workflows = [str(root / f) for f in FILES[1:3]]
    lint = subprocess.run([str(BIN / "actionlint"), "-config-file", str(root / FILES[3]), *workflows],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    audit = subprocess.run([str(BIN / "zizmor"), "--offline", "--config", str(root / FILES[4]), "--min-severity",
                            "medium", *workflows],
                           capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr

    # the same answers as flags, without a terminal: the same files
    flags = tmp_path / "flags"
    model_repo(flags, tiny_model)
    proc = swiftci("init", "--dir", str(flags), "--yes", "--name", "support-bot", "--model", "base-model",
                   "--gpu-memory", "80", "--tasks", "arc_easy", "--gate", "arc_easy/acc>=0.3", "--quantize",
                   "--no-deploy", "--max-runtime", "2h")
    assert proc.returncode == 0, proc.stderr
    assert all((flags / f).read_text() == (root / f).read_text() for f in FILES)


def test_ctrl_c_midway_leaves_nothing(tiny_model, tmp_path):
    root = model_repo(tmp_path / "repo", tiny_model)
    child = spawn(root)
    answer(child, "Run name:", "\r")
    answer(child, "Base model", "\x03")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "nothing was written" in child.before
    assert not any((root / f).exists() for f in FILES)


def test_existing_files_are_never_overwritten_without_force(tmp_path):
    (tmp_path / "swiftci.yaml").write_text("name: mine\n")
    proc = swiftci("init", "--dir", str(tmp_path), "--yes")
    assert proc.returncode == 2 and "swiftci.yaml already exists; pass --force" in proc.stderr
    assert (tmp_path / "swiftci.yaml").read_text() == "name: mine\n"
    assert not (tmp_path / ".github").exists(), "all or nothing"
    assert swiftci("init", "--dir", str(tmp_path), "--yes", "--force").returncode == 0
    assert (tmp_path / "swiftci.yaml").read_text().startswith("# swiftci.yaml, written by `swiftci init`")


def test_the_shipped_workflows_are_what_init_writes_by_default(tmp_path):
    """workflows/ (ready to copy) and `swiftci init` never drift apart."""
    from conftest import ROOT

    assert swiftci("init", "--dir", str(tmp_path), "--yes").returncode == 0
    assert (tmp_path / FILES[1]).read_text() == (ROOT / "workflows/push-to-deploy.yml").read_text()
    assert (tmp_path / FILES[2]).read_text() == (ROOT / "workflows/pr-eval.yml").read_text()


@pytest.mark.parametrize("billions,memory,tuner", [(0.5, 80, "full"), (7, 80, "lora"), (7, 16, "qlora"),
                                                   (70, 80, "qlora")])
def test_the_rule_of_thumb_picks_the_cheapest_tuner_that_fits(billions, memory, tuner):
    from swiftci.init import recommend

    rec = recommend(billions, memory)
    assert rec.tuner == tuner
    assert rec.batch_size * rec.gradient_accumulation >= 16 or rec.batch_size == 8


def test_init_for_a_preference_method_on_pairs(tiny_model, tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(TINY / "data/pairs.jsonl", tmp_path / "data/train.jsonl")
    proc = swiftci("init", "--dir", str(tmp_path), "--yes", "--method", "dpo", "--model", str(tiny_model))
    assert proc.returncode == 0, proc.stderr
    assert "method: dpo" in (tmp_path / "swiftci.yaml").read_text()
    assert swiftci("validate", "-c", str(tmp_path / "swiftci.yaml")).returncode == 0
