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


# --- the last green run, fetched from GitHub's API (tests/fakes/github_api.py) -------------------------------------

TOKEN = "ghs_fake_token_for_tests_0123456789"


@pytest.fixture
def github(httpserver, monkeypatch):
    from fakes.github_api import FakeGitHub

    fake = FakeGitHub(token=TOKEN)
    for key, value in {"GITHUB_API_URL": fake.install(httpserver), "GITHUB_TOKEN": TOKEN,
                       "GITHUB_REPOSITORY": "acme/model-repo", "GITHUB_RUN_ID": "900"}.items():
        monkeypatch.setenv(key, value)
    return fake


def _reports_of(folder, stage) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (folder / stage).iterdir() if p.suffix in (".json", ".md")}


def test_the_last_green_runs_reports_are_fetched_verified_and_guarded_against(two_runs, github, tmp_path):
    cfg, green = two_runs
    name = "tiny-reverse"
    github.add_run(700, created_at="2026-12-01T08:00:00Z")  # older green run: not the newest
    github.add_artifact(700, f"swiftci-reports-train-{name}-sft-20261201-aaaaaaa", {"train_report.json": b"{}"})
    github.add_run(710, created_at="2026-12-01T09:00:00Z")
    github.add_artifact(710, f"swiftci-reports-train-{name}-sft-20261201-bbbbbbb", _reports_of(green, "train"))
    github.add_artifact(710, f"swiftci-reports-evaluate-{name}-sft-20261201-bbbbbbb", _reports_of(green, "evaluate"))
    github.add_artifact(710, f"swiftci-train-{name}-sft-20261201-bbbbbbb", {"model.safetensors": b"weights"})
    github.add_run(720, created_at="2026-12-01T10:00:00Z")  # newer, but another config's run
    github.add_artifact(720, "swiftci-reports-train-other-bot-sft-20261201-ccccccc", {"train_report.json": b"{}"})
    github.add_run(730, created_at="2026-12-01T11:00:00Z", conclusion="failure")  # red
    github.add_artifact(730, f"swiftci-reports-train-{name}-sft-20261201-ddddddd", {"train_report.json": b"{}"})
    github.add_run(740, created_at="2026-12-01T12:00:00Z", event="pull_request", branch="feat/x")  # not main
    github.add_artifact(740, f"swiftci-reports-train-{name}-sft-20261201-eeeeeee", {"train_report.json": b"{}"})

    out = tmp_path / "last-green"
    proc = swiftci_in_process("last-green", "-c", str(cfg), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "last green run 710" in proc.stdout
    record = read_json(out / "last_green.json")
    assert record["run_id"] == 710 and record["branch"] == "main"
    assert sorted(a["stage"] for a in record["artifacts"]) == ["evaluate", "train"]
    assert not (out / "train/model.safetensors").exists()  # reports only, never weights
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        n for n in _reports_of(green, "train") if n.endswith(".json"))

    guarded = swiftci_in_process("guard", "-c", str(cfg), "--against", str(out), "--format", "json")
    assert guarded.returncode == 0, guarded.stderr
    deltas = {d["name"]: d for d in json.loads(guarded.stdout)["deltas"]}
    assert deltas["train tokens/s"]["flagged"] and deltas["train tokens/s"]["change_pct"] == pytest.approx(-20)


@pytest.fixture
def light(tiny_model, tmp_path):
    from conftest import tiny_config, write_config

    return write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out"))


def test_a_tampered_or_unsafe_artifact_is_refused_and_the_folder_left_as_it_was(light, github, tmp_path):
    out = tmp_path / "last-green"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier fetch")
    github.add_run(710)
    aid = github.add_artifact(710, "swiftci-reports-train-tiny-reverse-sft-1-b", {"train_report.json": b"{}"})
    github.artifacts[aid]["digest"] = "sha256:" + "0" * 64  # bytes changed after upload
    proc = swiftci_in_process("last-green", "-c", str(light), "--out", str(out))
    assert proc.returncode == 3 and "do not match the digest" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    github.artifacts[aid]["digest"] = None  # an artifact from before digests: cannot be verified
    proc = swiftci_in_process("last-green", "-c", str(light), "--out", str(out))
    assert proc.returncode == 3 and "cannot be verified" in proc.stderr

    github.artifacts.clear()
    github.add_artifact(710, "swiftci-reports-train-tiny-reverse-sft-1-b", {"../../escape.json": b"{}"})
    proc = swiftci_in_process("last-green", "-c", str(light), "--out", str(out))
    assert proc.returncode == 3 and "outside its folder" in proc.stderr
    assert not (tmp_path / "escape.json").exists() and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_no_green_run_yet_is_not_an_error_and_this_run_is_never_its_own_baseline(light, github, tmp_path,
                                                                                 monkeypatch):
    github.add_run(900)  # this very run (GITHUB_RUN_ID), already marked green by a re-run
    github.add_artifact(900, "swiftci-reports-train-tiny-reverse-sft-1-b", {"train_report.json": b"{}"})
    proc = swiftci_in_process("last-green", "-c", str(light), "--out", str(tmp_path / "lg"), "--github-output")
    assert proc.returncode == 0, proc.stderr
    assert "no green run of 'tiny-reverse'" in proc.stdout and "found=false" in proc.stdout.splitlines()
    assert not (tmp_path / "lg").exists()

    monkeypatch.delenv("GITHUB_TOKEN")
    proc = swiftci_in_process("last-green", "-c", str(light), "--out", str(tmp_path / "lg"))
    assert proc.returncode == 2 and "GITHUB_TOKEN" in proc.stderr and "actions: read" in proc.stderr


def test_a_stage_only_one_run_ran_shows_as_missing_not_as_a_crash(two_runs):
    cfg, green = two_runs
    shutil.rmtree(cfg.parent / "out/evaluate")  # this run trained only
    proc = swiftci_in_process("guard", "-c", str(cfg), "--against", str(green), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deltas = {d["name"]: d for d in json.loads(proc.stdout)["deltas"]}
    assert deltas["tiny_reverse/exact_match"]["after"] is None and not deltas["tiny_reverse/exact_match"]["flagged"]
    assert deltas["train tokens/s"]["flagged"]
