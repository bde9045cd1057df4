"""The regression guard: this run's reports against the last green run's, through `swiftci guard` and the comment."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import clone_trained, read_json, swiftci_in_process

pytestmark = pytest.mark.slow


def _eval_report(folder, exact_match: float, perplexity: float) -> None:
    (folder / "evaluate").mkdir(parents=True, exist_ok=True)
    (folder / "evaluate/eval_report.json").write_text(json.dumps({"version": 2, "stage": "evaluate", "status": "passed",
        "metrics": {"tiny_reverse": {"exact_match": {"value": exact_match, "higher_is_better": True}},
                    "wikitext": {"word_perplexity": {"value": perplexity, "higher_is_better": False}}}}))


@pytest.fixture
def two_runs(trained, tiny_model, tmp_path):
    """This run: the shared trained model's real report. The last green run: the same report with 25 % more
    tokens/s (so this run is 20 % slower) and 5 % less peak memory, and eval figures beside this run's."""
    cfg = clone_trained(trained, tmp_path / "now", tiny_model)
    _eval_report(tmp_path / "now/out", exact_match=0.90, perplexity=20.0)
    green = tmp_path / "green"
    shutil.copytree(tmp_path / "now/out/train", green / "train")
    report = read_json(green / "train/train_report.json")
    report["metrics"]["tokens_per_second"] *= 1.25
    report["metrics"]["peak_memory_mb"] /= 1.05
    (green / "train/train_report.json").write_text(json.dumps(report))
    _eval_report(green, exact_match=0.92, perplexity=16.0)
    return cfg, green


def test_a_run_20_percent_slower_is_flagged_and_fails_only_when_asked(two_runs):
    cfg, green = two_runs
    proc = swiftci_in_process("guard", "-c", str(cfg), "--against", str(green), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # guard.fail is off by default: a warning
    deltas = {d["name"]: d for d in json.loads(proc.stdout)["deltas"]}
    assert deltas["train tokens/s"]["flagged"] and deltas["train tokens/s"]["change_pct"] == pytest.approx(-20)
    assert not deltas["train peak memory (MB)"]["flagged"], "+5 % is within the default +10 %"
    assert not deltas["train final loss"]["flagged"] and deltas["train final loss"]["change_pct"] == 0
    assert not deltas["tiny_reverse/exact_match"]["flagged"], "-2.2 % is within the default -5 %"
    assert deltas["wikitext/word_perplexity"]["flagged"], "lower is better: +25 % is a regression"
    assert deltas["wikitext/word_perplexity"]["limit"] == "+5%"

    strict = swiftci_in_process("guard", "-c", str(cfg), "--against", str(green), "--set", "guard.fail=true")
    assert strict.returncode == 1
    assert "| train tokens/s |" in strict.stdout and "-20.0% ⚠️" in strict.stdout
    assert "⚠️ beyond the guard: train tokens/s, wikitext/word_perplexity" in strict.stdout

    lenient = swiftci_in_process("guard", "-c", str(cfg), "--against", str(green), "--set", "guard.fail=true",
                                 "--set", "guard.tokens_per_second=-25%", "--set", "guard.eval_metric=-30%")
    assert lenient.returncode == 0 and "Within the guard." in lenient.stdout


def test_the_sticky_comment_shows_the_deltas(two_runs, monkeypatch):
    cfg, green = two_runs
    for var in ("GITHUB_EVENT_PATH", "GITHUB_TOKEN", "GITHUB_EVENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    proc = swiftci_in_process("comment", "-c", str(cfg), "--since", str(green))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    body = (cfg.parent / "out/comment.md").read_text()
    assert "#### Since the last green run on the default branch" in body and "-20.0% ⚠️" in body


def test_bad_guard_settings_and_folders(two_runs, tmp_path):
    cfg, _ = two_runs
    proc = swiftci_in_process("guard", "-c", str(cfg), "--against", str(tmp_path), "--set",
                              "guard.peak_memory=10%")
    assert proc.returncode == 2 and "guard.peak_memory" in proc.stderr and '"+10%"' in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = swiftci_in_process("guard", "-c", str(cfg), "--against", str(empty))
    assert proc.returncode == 2 and "holds no train/ or evaluate/ reports" in proc.stderr
