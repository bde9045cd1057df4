"""Fail before the GPU: `validate`, `run` and each stage command find what a later stage would fail on — unknown
tasks, missing task data, gates on metrics or filters a task does not produce, bad data rows — and exit 2 before
any model loads (no stage folder is ever written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import TINY, swiftci_in_process, tiny_config, write_config


def config(tmp_path: Path, tiny_model: Path, **sections) -> Path:
    return write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out", **sections))


def test_a_task_misspelt_in_tasks_and_gate_fails_validate_and_run_before_training(tiny_model, tmp_path):
    cfg = config(tmp_path, tiny_model, evaluate={
        "tasks": ["tiny_revrse"], "gates": [{"metric": "tiny_revrse/exact_match", "min": 0.1}]})
    for command in ("validate", "run", "train"):
        proc = swiftci_in_process(command, "-c", str(cfg))
        assert proc.returncode == 2, (command, proc.stderr)
        assert "evaluate.tasks[0]: unknown lm-eval task 'tiny_revrse'" in proc.stderr, proc.stderr
        assert "did you mean 'tiny_reverse'?" in proc.stderr
        assert not (tmp_path / "out").exists(), f"{command}: a stage started before the check"


def test_a_task_yaml_whose_data_file_is_missing(tiny_model, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(TINY / "tasks", tasks)
    text = (TINY / "tasks/tiny_reverse.yaml").read_text().replace("test: reverse.jsonl", "test: data/reverse.jsonl")
    (tasks / "tiny_reverse.yaml").write_text(text)
    cfg = config(tmp_path, tiny_model, evaluate={"task_dir": str(tasks)})
    proc = swiftci_in_process("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert "evaluate.tasks[0]: task 'tiny_reverse' reads data/reverse.jsonl, which does not exist" in proc.stderr
    (tasks / "data").mkdir()
    (tasks / "data/reverse.jsonl").write_text((TINY / "tasks/reverse.jsonl").read_text())
    assert swiftci_in_process("validate", "-c", str(cfg)).returncode == 0


def test_every_bad_data_row_is_listed_with_the_missing_field(tiny_model, tmp_path):
    rows = [{"instruction": "reverse: abcd", "output": "dcba"}, {"instruction": "reverse: wxyz"},
            {"instruction": "reverse: mnop", "output": "ponm"}, {"input": "qrst", "output": "tsrq"}]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps(rows[0]) + "\n")
    cfg = config(tmp_path, tiny_model, data={"train": str(data), "validation": str(validation), "format": "alpaca"})
    proc = swiftci_in_process("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert "data.train: 2 of 4 rows" in proc.stderr
    assert "row 2: alpaca rows need string `instruction` and `output`; this one has no string `output` (missing)" \
        in proc.stderr
    assert "row 4:" in proc.stderr and "`instruction` (missing)" in proc.stderr
    assert "row 1:" not in proc.stderr and "row 3:" not in proc.stderr


def test_a_gate_on_a_filter_the_task_does_not_define(tiny_model, tmp_path):
    cfg = config(tmp_path, tiny_model, evaluate={
        "gates": [{"metric": "tiny_reverse/exact_match,strict-match", "min": 0.1}]})
    proc = swiftci_in_process("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert ("evaluate.gates[0].metric: task 'tiny_reverse' has no filter 'strict-match' (its filters: none)"
            in proc.stderr), proc.stderr
    ok = config(tmp_path, tiny_model, evaluate={"gates": [{"metric": "tiny_reverse/exact_match,none", "min": 0.1}]})
    assert swiftci_in_process("validate", "-c", str(ok)).returncode == 0


def test_an_unquoted_comma_in_a_flow_mapping_gets_a_hint(tiny_model, tmp_path):
    cfg = config(tmp_path, tiny_model)
    proc = swiftci_in_process("validate", "-c", str(cfg), "--set",
                              "evaluate.gates=[{metric: tiny_reverse/exact_match,strict-match, min: 0.1}]")
    assert proc.returncode == 2
    assert "unknown key 'strict-match'" in proc.stderr and "quote the value" in proc.stderr, proc.stderr


def test_a_typo_in_the_task_list_is_named_there_not_in_the_gate(tiny_model, tmp_path):
    cfg = config(tmp_path, tiny_model, evaluate={
        "tasks": ["tiny_revers"], "gates": [{"metric": "tiny_reverse/exact_match", "min": 0.1}]})
    proc = swiftci_in_process("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert "evaluate.tasks[0]: 'tiny_revers' is no task in" in proc.stderr, proc.stderr
    assert "did you mean 'tiny_reverse'?" in proc.stderr and "did you mean 'tiny_revers'" not in proc.stderr
