"""Preference tuning through trl's own trainers on the tiny model: each method learns (its loss falls and stays
finite; DPO prefers the right answer on held-out pairs), bad rows are all listed before anything loads, and DPO's
reference with LoRA is the base with the adapter disabled, never a second copy."""

from __future__ import annotations

import json
import math
import random
import statistics
import string
from pathlib import Path

import pytest

from conftest import swiftci_in_process, tiny_config, write_config


def pairs(n: int, seed: int) -> list[dict]:
    """Reversal pairs in trl's conversational shape: chosen the reversal, rejected a near miss (the word itself, or
    the reversal with its first two letters swapped)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
        good = word[::-1]
        bad = word if rng.random() < 0.5 else good[1] + good[0] + good[2:]
        if bad != good:
            out.append({"prompt": [{"role": "user", "content": f"reverse: {word}"}],
                        "chosen": [{"role": "assistant", "content": good}],
                        "rejected": [{"role": "assistant", "content": bad}]})
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, tiny_model: Path, method: str, **train) -> Path:
    data = {"train": str(write_rows(tmp_path / "pairs.jsonl", pairs(256, 1))),
            "validation": str(write_rows(tmp_path / "held-out.jsonl", pairs(32, 2))), "format": "auto"}
    cfg = tiny_config(tiny_model, tmp_path / "out", data=data, evaluate=None, quantize=None, deploy=None,
                      train={"method": method, "max_steps": 60, "logging_steps": 2, "save_steps": 1000,
                             "batch_size": 8, "learning_rate": 1e-3, "max_length": 64, **train})
    return write_config(tmp_path / "swiftci.yaml", cfg)


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo", "simpo"])
def test_each_method_learns_on_preference_pairs(tiny_model, tmp_path, method):
    proc = swiftci_in_process("train", "-c", str(config(tmp_path, tiny_model, method)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out/train/train_report.json").read_text())
    assert report["status"] == "ok" and report["method"] == method and "adapter" in report["outputs"]
    assert report["logits"]["used"] == "all", "trl's trainers compute their own logits"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out/train/loss.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses)
    half = len(losses) // 2
    assert statistics.mean(losses[half:]) < statistics.mean(losses[:half]), losses
    if method != "kto":  # KTO logs rewards per class, not paired accuracies
        assert "rewards_accuracies" in report["metrics"]["validation_preference"]
    if method == "dpo":
        assert report["metrics"]["validation_preference"]["rewards_accuracies"] > 0.5
        md = (tmp_path / "out/train/train_report.md").read_text()
        assert "| preference | reward accuracy" in md and "(held-out)" in md


def test_dpo_with_lora_scores_the_reference_on_the_same_weights(tiny_model, tmp_path, monkeypatch):
    from swiftci import models

    loads = []
    real = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    proc = swiftci_in_process("train", "-c", str(config(tmp_path, tiny_model, "dpo", max_steps=4)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(loads) == 1, f"the base model was loaded {len(loads)} times"


BAD = [
    ({"prompt": "reverse: abcd", "rejected": "abcd"}, "row 2: missing `chosen`"),
    ({"prompt": "reverse: abcd", "chosen": "dcba", "rejected": "dcba"}, "row 3: `chosen` equals `rejected`"),
    ({"prompt": "", "chosen": "dcba", "rejected": "abcd"}, "row 4: `prompt` is empty"),
]


def test_bad_preference_rows_are_all_listed_and_nothing_trains(tiny_model, tmp_path):
    good = {"prompt": "reverse: wxyz", "chosen": "zyxw", "rejected": "wxyz"}
    data = write_rows(tmp_path / "bad.jsonl", [good, *[row for row, _ in BAD]])
    cfg = tiny_config(tiny_model, tmp_path / "out", data={"train": str(data), "validation": None,
                                                          "format": "preference"},
                      train={"method": "dpo"}, evaluate=None, quantize=None, deploy=None)
    cfg["data"].pop("validation")
    path = write_config(tmp_path / "swiftci.yaml", cfg)
    for command in ("validate", "train"):
        proc = swiftci_in_process(command, "-c", str(path))
        assert proc.returncode == 2, (command, proc.stderr)
        assert all(message in proc.stderr for _, message in BAD), proc.stderr
        assert "row 1" not in proc.stderr
    report = json.loads((tmp_path / "out/train/train_report.json").read_text())
    assert report["status"] == "failed" and not (tmp_path / "out/train/adapter").exists(), "nothing trained"


def test_kto_labels_must_be_booleans(tiny_model, tmp_path):
    rows = [{"prompt": "reverse: abcd", "completion": "dcba", "label": True},
            {"prompt": "reverse: abcd", "completion": "abcd", "label": "no"}]
    cfg = tiny_config(tiny_model, tmp_path / "out", data={"train": str(write_rows(tmp_path / "kto.jsonl", rows)),
                                                          "format": "preference"},
                      train={"method": "kto", "batch_size": 2}, evaluate=None, quantize=None, deploy=None)
    cfg["data"].pop("validation", None)
    proc = swiftci_in_process("validate", "-c", str(write_config(tmp_path / "swiftci.yaml", cfg)))
    assert proc.returncode == 2 and "row 2: `label` must be true or false, not 'no'" in proc.stderr


def test_a_method_and_rows_that_do_not_match_are_a_config_error(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "out", train={"method": "dpo"}, evaluate=None, quantize=None,
                      deploy=None)  # the tiny example's rows are sft `messages`
    proc = swiftci_in_process("validate", "-c", str(write_config(tmp_path / "swiftci.yaml", cfg)))
    assert proc.returncode == 2 and "data.format: dpo trains on preference rows" in proc.stderr


def test_sft_then_dpo_in_one_run_and_later_stages_take_the_final_model(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "out", quantize=None, deploy=None,
                      train={"max_steps": 20, "logging_steps": 5, "save_steps": 1000, "batch_size": 8,
                             "then": {"method": "dpo", "max_steps": 8, "learning_rate": 1e-3,
                                      "data": {"train": str(write_rows(tmp_path / "pairs.jsonl", pairs(64, 1)))}}},
                      evaluate={"tasks": ["tiny_reverse"], "limit": 5, "baseline": "none",
                                "gates": [{"metric": "tiny_reverse/exact_match", "min": 0.0}]})
    path = write_config(tmp_path / "swiftci.yaml", cfg)
    proc = swiftci_in_process("run", "-c", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = tmp_path / "out/train"
    sft = json.loads((train / "sft/train_report.json").read_text())
    dpo = json.loads((train / "dpo/train_report.json").read_text())
    stage = json.loads((train / "train_report.json").read_text())
    assert (sft["method"], dpo["method"], stage["method"]) == ("sft", "dpo", "dpo")
    assert stage["outputs"] == {"model": "dpo/model"} and [s["method"] for s in stage["steps"]] == ["sft", "dpo"]
    lineage = json.loads((train / "dpo/run.json").read_text())
    assert lineage["parent"]["run_id"] == sft["run_id"] and lineage["base_model"]["id"].endswith("sft/model")
    evaluated = json.loads((tmp_path / "out/evaluate/eval_report.json").read_text())
    assert evaluated["model"]["path"].endswith("dpo/model") and evaluated["verified"]["train"] == stage["files_sha256"]

    # an interrupted second step: --resume keeps the finished sft step and trains the second again
    before = (train / "sft/train_report.json").read_bytes()
    import shutil

    shutil.rmtree(train / "dpo")
    proc = swiftci_in_process("train", "-c", str(path), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the sft step" in proc.stdout + proc.stderr and "already finished" in proc.stdout + proc.stderr
    assert (train / "sft/train_report.json").read_bytes() == before
    assert json.loads((train / "train_report.json").read_text())["status"] == "ok"


def test_the_dpo_example_validates_with_its_pairs():
    from conftest import TINY

    proc = swiftci_in_process("validate", "-c", str(TINY / "swiftci-dpo.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "stages: train, evaluate" in proc.stdout


def test_in_a_chain_the_reference_is_the_sft_model_unless_base_is_asked(tiny_model, tmp_path):
    from swiftci import config, train

    rows = write_rows(tmp_path / "pairs.jsonl", pairs(8, 1))
    cfg = tiny_config(tiny_model, tmp_path / "out", evaluate=None, quantize=None, deploy=None,
                      train={"then": {"method": "dpo", "data": {"train": str(rows)}}})
    loaded = config.load(write_config(tmp_path / "swiftci.yaml", cfg))
    assert loaded.train.then.dpo.reference == "sft"
    step = train._then_config(loaded, tmp_path / "out/train/sft/model")
    assert step.train.dpo.reference == "base", "the step's own starting model: the adapter disabled, one copy"
    cfg["train"]["then"]["dpo"] = {"reference": "base"}
    loaded = config.load(write_config(tmp_path / "swiftci.yaml", cfg))
    step = train._then_config(loaded, tmp_path / "out/train/sft/model")
    assert step.train.dpo.reference == str(loaded.model_local_path), "model.id, loaded beside the sft model"
    single = tiny_config(tiny_model, tmp_path / "out", evaluate=None, quantize=None, deploy=None,
                         data={"train": str(rows), "format": "preference"}, train={"method": "dpo",
                                                                                    "dpo": {"reference": "sft"}})
    single["data"].pop("validation", None)
    proc = swiftci_in_process("validate", "-c", str(write_config(tmp_path / "single.yaml", single)))
    assert proc.returncode == 2 and "`sft` names the SFT step of a chain" in proc.stderr


def test_a_nan_reward_stops_the_run_like_a_nan_loss(tiny_model, tmp_path, monkeypatch):
    """trl's logged rewards pass through preference.logged; a NaN there (the stand-in) must stop training."""
    from swiftci import preference

    real = preference.logged
    monkeypatch.setattr(preference, "logged", lambda logs: {**real(logs), "rewards_margins": float("nan")}
                        if "rewards/margins" in logs else real(logs))
    proc = swiftci_in_process("train", "-c", str(config(tmp_path, tiny_model, "dpo", max_steps=6)))
    assert proc.returncode == 4, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out/train/train_report.json").read_text())
    assert report["error"]["kind"] == "Diverged" and "rewards_margins is nan" in report["error"]["reason"]
