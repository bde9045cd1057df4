"""Reruns say what they do: a run into a folder that holds a finished run of the same config either keeps it
(`--reuse`: stages whose config, files and input model are unchanged) or starts over with a notice; `--resume` of
a finished training leaves its report as it is."""

from __future__ import annotations

from pathlib import Path

from conftest import clone_trained, swiftci_in_process, tiny_config, write_config

QUICK = {"train": {"max_steps": 4, "save_steps": 1000, "logging_steps": 2},
         "evaluate": {"tasks": ["tiny_reverse"], "limit": 4, "baseline": "none",
                      "gates": [{"metric": "tiny_reverse/exact_match", "min": 0.0}]},
         "quantize": None, "deploy": None}


def reports(out: Path) -> dict[str, bytes]:
    return {stage: (out / stage / name).read_bytes()
            for stage, name in (("train", "train_report.json"), ("evaluate", "eval_report.json"))}


def test_reuse_keeps_what_is_unchanged_and_reruns_the_rest(tiny_model, tmp_path):
    cfg = str(write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out", **QUICK)))
    out = tmp_path / "out"
    assert swiftci_in_process("run", "-c", cfg).returncode == 0
    first = reports(out)

    proc = swiftci_in_process("run", "-c", cfg, "--reuse")
    assert proc.returncode == 0, proc.stderr
    assert "==> train: reusing the finished run" in proc.stderr and "==> evaluate: reusing" in proc.stderr
    assert reports(out) == first, "nothing was rewritten"

    proc = swiftci_in_process("run", "-c", cfg, "--reuse", "--set", "evaluate.limit=3")
    assert proc.returncode == 0, proc.stderr
    assert "==> train: reusing" in proc.stderr and "==> evaluate: reusing" not in proc.stderr
    now = reports(out)
    assert now["train"] == first["train"] and now["evaluate"] != first["evaluate"]

    proc = swiftci_in_process("run", "-c", cfg)  # the same config again, without --reuse: a notice, then anew
    assert proc.returncode == 0, proc.stderr
    assert "holds a finished train of this same config and inputs; starting over" in proc.stderr
    assert "reusing" not in proc.stderr and reports(out)["train"] != first["train"]

    weights = next((out / "train/adapter").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # a file changed since: never reused
    proc = swiftci_in_process("run", "-c", cfg, "--reuse")
    assert proc.returncode == 0, proc.stderr
    assert "reusing" not in proc.stderr


def test_resume_of_a_finished_training_leaves_its_report(trained, tiny_model, tmp_path):
    cfg = clone_trained(trained, tmp_path, tiny_model)
    report = tmp_path / "out/train/train_report.json"
    before = report.read_bytes()
    proc = swiftci_in_process("train", "-c", str(cfg), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "already finished with this config and data; nothing to resume" in proc.stdout + proc.stderr
    assert report.read_bytes() == before
