"""`swiftci evaluate` with real lm-eval on the tiny model: gates pass and fail, and every broken case fails closed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, TINY, clone_trained, read_json, swiftci, swiftci_in_process, tiny_config, write_config
from swiftci.evaluate import render_markdown

pytestmark = pytest.mark.slow
BROKEN_TASKS = ROOT / "tests" / "data" / "tasks"
GOLDEN = ROOT / "tests" / "golden"


def evaluate(cfg: Path, *args: str):
    return swiftci_in_process("evaluate", "-c", str(cfg), *args)


def outputs(cfg: Path) -> tuple[dict, str]:
    out = cfg.parent / "out" / "evaluate"
    return read_json(out / "eval_report.json"), (out / "eval_report.md").read_text()


def lm_eval_of_the_base_model(tiny_model: Path, tasks: list[str]) -> dict[str, dict[str, float]]:
    """The base model scored by lm-eval itself, in this process, with the evaluate section's settings: what the
    `baseline: base` columns must equal, whatever the base model happens to score."""
    import contextlib

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TINY / "tasks"), include_defaults=False)
    with contextlib.chdir(TINY / "tasks"):
        raw = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model},dtype=float32", tasks=tasks,
                              task_manager=manager, batch_size=32, device="cpu", apply_chat_template=True,
                              bootstrap_iters=0)
    return {task: {k.split(",")[0]: v for k, v in values.items() if k.endswith(",none") and "_stderr" not in k}
            for task, values in raw["results"].items()}


def test_pass_with_baseline_scored_on_the_same_weights(trained, tiny_model, tmp_path):
    cfg = clone_trained(trained, tmp_path, tiny_model)
    proc = evaluate(cfg)
    assert proc.returncode == 0, proc.stderr
    report, md = outputs(cfg)
    assert report["version"] == 2 and report["stage"] == "evaluate"
    assert report["status"] == "passed" and report["passed"] is True
    assert report["model_loads"] == 1, "the baseline must reuse the loaded base weights with the adapter disabled"
    # the baseline is the base model, whatever it scores: the same numbers as lm-eval on the base model alone
    base = lm_eval_of_the_base_model(tiny_model, ["tiny_reverse", "tiny_reverse_mc"])
    em = report["metrics"]["tiny_reverse"]["exact_match"]
    mc = report["metrics"]["tiny_reverse_mc"]["acc"]
    assert em["baseline"] == pytest.approx(base["tiny_reverse"]["exact_match"], abs=1e-9)
    assert mc["baseline"] == pytest.approx(base["tiny_reverse_mc"]["acc"], abs=1e-9)
    assert em["value"] >= 0.9, "the trained adapter learned the task"
    assert em["delta"] == pytest.approx(em["value"] - em["baseline"])
    assert mc["stderr"] is not None and mc["baseline_stderr"] is not None
    assert [g["passed"] for g in report["gates"]] == [True, True]
    assert report["tasks"]["tiny_reverse"]["samples"] == 100
    assert report["tasks"]["tiny_reverse"]["baseline_seconds"] > 0
    assert report["run_id"] == read_json(trained.train_dir / "train_report.json")["run_id"]
    assert "✅ **PASS** — all 2 gates passed" in md
    assert f"| `tiny_reverse/exact_match` | {em['baseline']:.4f} | {em['value']:.4f} |" in md
    lm_eval = read_json(cfg.parent / "out/evaluate/lm_eval/candidate.json")
    assert "tiny_reverse" in lm_eval["results"] and lm_eval["n-samples"]["tiny_reverse"]["effective"] == 100
    assert (cfg.parent / "out/evaluate/lm_eval/baseline.json").is_file()


def test_failing_gate_exits_1_and_names_it(trained, tiny_model, tmp_path):
    cfg = clone_trained(trained, tmp_path, tiny_model, evaluate={
        "tasks": ["tiny_reverse", "tiny_reverse6"], "baseline": "none",
        "gates": [{"metric": "tiny_reverse/exact_match", "min": 0.9},
                  {"metric": "tiny_reverse6/exact_match", "min": 0.5}]})
    proc = evaluate(cfg)
    assert proc.returncode == 1, proc.stderr
    assert "tiny_reverse6/exact_match" in proc.stderr and "< min 0.5" in proc.stderr
    report, md = outputs(cfg)
    assert report["status"] == "failed" and report["passed"] is False
    assert [g["passed"] for g in report["gates"]] == [True, False]
    assert report["model_loads"] == 1 and report["metrics"]["tiny_reverse6"]["exact_match"]["baseline"] is None
    assert "❌ **FAIL** — 1 of 2 gates failed" in md
    assert any(line.startswith("| `tiny_reverse6/exact_match` |") and line.rstrip().endswith("❌ |")
               for line in md.splitlines())

    # what the model answered: lm-eval's per-sample records kept, the lowest-scoring ones of the failed gate shown
    records = [json.loads(line) for line in (cfg.parent / "out/evaluate/samples/candidate/tiny_reverse6.jsonl")
               .read_text().splitlines()]
    assert len(records) == report["tasks"]["tiny_reverse6"]["samples"]
    shown = report["samples"]["lowest_scoring"]
    assert list(shown) == ["tiny_reverse6/exact_match"], "only the failed gate's samples are shown"
    by_id = {r["doc_id"]: r for r in records}
    assert 0 < len(shown["tiny_reverse6/exact_match"]) <= 3
    for row in shown["tiny_reverse6/exact_match"]:
        record = by_id[row["doc_id"]]
        assert f"reverse: {record['doc']['word']}" in row["prompt"]
        assert (row["expected"], row["got"]) == (record["doc"]["reversed"], record["filtered_resps"][0])
        assert row["score"] == min(r["exact_match"] for r in records)
        assert f"| {row['doc_id']} |" in md and record["doc"]["reversed"] in md
    assert "What the model answered" in md


def test_samples_shown_in_reports_are_redacted(trained, tiny_model, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(TINY / "tasks", tasks)
    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    (tasks / "reverse6.jsonl").write_text(json.dumps({"word": token, "reversed": token[::-1]}) + "\n")
    cfg = clone_trained(trained, tmp_path, tiny_model, evaluate={
        "tasks": ["tiny_reverse6"], "task_dir": str(tasks), "baseline": "none",
        "gates": [{"metric": "tiny_reverse6/exact_match", "min": 1.0}]})
    assert evaluate(cfg).returncode == 1
    report, md = outputs(cfg)
    (row,) = report["samples"]["lowest_scoring"]["tiny_reverse6/exact_match"]
    assert token not in json.dumps(report) and token not in md and "reverse: •••" in row["prompt"]


def test_earlier_report_as_baseline(trained, tiny_model, tmp_path):
    """A production model's eval_report.json is the baseline: a drop beyond max_drop fails."""
    production = tmp_path / "production_eval_report.json"
    production.write_text(json.dumps({"version": 1, "stage": "evaluate", "metrics": {
        "tiny_reverse": {"exact_match": {"value": 1.0, "stderr": 0.0}}}}))
    cfg = clone_trained(trained, tmp_path, tiny_model, evaluate={
        "tasks": ["tiny_reverse"], "baseline": str(production), "limit": 20,
        "gates": [{"metric": "tiny_reverse/exact_match", "max_drop": 0.0}]})
    proc = evaluate(cfg, "--set", "evaluate.gates=[{metric: tiny_reverse/exact_match, max_drop: '50%'}]")
    assert proc.returncode == 0, proc.stderr
    report, md = outputs(cfg)
    assert report["baseline"]["kind"] == "report" and report["model_loads"] == 1
    assert report["metrics"]["tiny_reverse"]["exact_match"]["baseline"] == 1.0
    assert "drop ≤ 50%" in md


FAIL_CLOSED = [
    # (task, gate metric, exit code, reason in both reports)
    ("nan_metric", "nan_metric/score", 1, "value is nan, not a number"),
    # config mistakes found only after scoring are still config mistakes (exit 2), never a worse model
    ("no_metric_list", "no_metric_list/acc", 2, "metric missing from the results (task produced: exact_match)"),
    ("empty_task", "empty_task/exact_match", 3, "task 'empty_task' has 0 samples"),
    ("missing_data", "missing_data/exact_match", 2, "task 'missing_data' reads"),
    ("tiny_reverse_typo", "tiny_reverse_typo/exact_match", 2, "unknown lm-eval task 'tiny_reverse_typo'"),
]


@pytest.mark.parametrize("task,metric,code,reason", FAIL_CLOSED, ids=[f[0] for f in FAIL_CLOSED])
def test_fails_closed(trained, tiny_model, tmp_path, task, metric, code, reason):
    cfg = clone_trained(trained, tmp_path, tiny_model, evaluate={
        "tasks": [task], "task_dir": str(BROKEN_TASKS), "baseline": "none",
        "gates": [{"metric": metric, "min": 0.0}]})
    proc = evaluate(cfg)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    report, md = outputs(cfg)
    assert report["passed"] is False and report["status"] in ("failed", "error")
    assert reason in report["gates"][0]["reason"] or reason in (report.get("error") or {}).get("reason", "")
    assert report["gates"][0]["passed"] is False
    assert reason in md and "❌ **FAIL**" in md
    if report["status"] == "error":  # the one failure shape of every stage
        assert set(report["error"]) == {"kind", "reason", "hint"} and all(report["error"].values())


def test_gate_on_a_metric_the_task_does_not_produce_is_a_config_error(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out", evaluate={
        "gates": [{"metric": "tiny_reverse/acc", "min": 0.5}]}))
    proc = swiftci("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert "evaluate.gates[0].metric: task 'tiny_reverse' produces exact_match, not 'acc'" in proc.stderr


def test_gate_on_a_task_that_is_not_configured_is_a_config_error(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out", evaluate={
        "gates": [{"metric": "tiny_revers/exact_match", "min": 0.5}]}))
    proc = swiftci("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert "task 'tiny_revers' is not in evaluate.tasks" in proc.stderr and "did you mean 'tiny_reverse'" in proc.stderr


def test_max_drop_without_baseline_is_a_config_error(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out", evaluate={
        "baseline": "none"}))
    proc = swiftci("validate", "-c", str(cfg))
    assert proc.returncode == 2 and "evaluate.gates[1].max_drop: needs a baseline" in proc.stderr


def test_a_baseline_given_on_the_command_line_is_checked_before_any_model_loads(tiny_model, tmp_path):
    """--baseline is relative to where it was typed (not to swiftci.yaml), and a file that is not an eval report
    stops the command with exit 2 before anything is evaluated or written."""
    cfg = write_config(tmp_path / "project/swiftci.yaml", tiny_config(tiny_model, tmp_path / "project/out"))
    (tmp_path / "here").mkdir()
    (tmp_path / "here/train_report.json").write_text(json.dumps({"version": 1, "stage": "train", "metrics": {}}))
    proc = swiftci("evaluate", "-c", str(cfg), "--baseline", "train_report.json", cwd=tmp_path / "here")
    assert proc.returncode == 2, proc.stderr
    assert f"--baseline: {tmp_path / 'here/train_report.json'} is not a swiftci eval_report.json" in proc.stderr
    assert not (tmp_path / "project/out/evaluate").exists(), "nothing was evaluated or written"
    proc = swiftci("evaluate", "-c", str(cfg), "--baseline", "none")
    assert proc.returncode == 2 and "--baseline: evaluate.gates[1] set max_drop, which needs a baseline" in proc.stderr


def test_max_drop_against_the_base_model_without_training_is_refused(tiny_model, tmp_path):
    doc = tiny_config(tiny_model, tmp_path / "out")
    doc.pop("train")
    cfg = write_config(tmp_path / "swiftci.yaml", doc)
    proc = evaluate(cfg)
    assert proc.returncode == 2, proc.stderr
    assert "evaluate.baseline: evaluate.gates[1] set max_drop" in proc.stderr and "IS the base model" in proc.stderr


def test_evaluate_refuses_a_failed_training(tiny_model, tmp_path):
    out = tmp_path / "out" / "train"
    out.mkdir(parents=True)
    (out / "train_report.json").write_text(json.dumps({"version": 1, "stage": "train", "status": "running"}))
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out"))
    proc = evaluate(cfg)
    assert proc.returncode == 3 and "the train stage did not finish" in proc.stderr


def test_strict_example_run_stops_with_exit_1(tiny_model, tmp_path):
    """`swiftci run` on examples/tiny/swiftci-strict.yaml: trains, evaluates, and stops with the gate's exit 1."""
    import yaml

    cfg = yaml.safe_load((TINY / "swiftci-strict.yaml").read_text())
    cfg["model"]["id"] = str(tiny_model)
    cfg["data"] = {k: str(TINY / v) if k != "format" else v for k, v in cfg["data"].items()}
    cfg["evaluate"]["task_dir"] = str(TINY / "tasks")
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["quantize"] = {"method": "gptq"}  # never reached: evaluate stops the run
    path = write_config(tmp_path / "swiftci.yaml", cfg)
    stale = tmp_path / "out/quantize/quantize_report.json"  # an earlier run's verdict in the same folder
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"version": 1, "stage": "quantize", "status": "passed", "passed": True}))
    proc = swiftci_in_process("run", "-c", str(path))
    assert proc.returncode == 1, proc.stderr
    assert not stale.exists(), "a run starts without the reports of an earlier one"
    assert "==> evaluate failed" in proc.stderr
    report, md = outputs(path)
    failed = [g for g in report["gates"] if not g["passed"]]
    assert [g["metric"] for g in failed] == ["tiny_reverse6/exact_match"]
    assert "| `tiny_reverse6/exact_match` |" in md and "< min 0.5 | ❌ |" in md


def test_markdown_report_golden():
    """What reviewers see: rendered from a fixed report, compared with the checked-in golden file."""
    report = read_json(GOLDEN / "eval_report.json")
    assert render_markdown(report) == (GOLDEN / "eval_report.md").read_text()


def test_markdown_report_for_an_evaluation_that_could_not_run():
    report = {"version": 2, "stage": "evaluate", "status": "error", "passed": False,
              "error": {"kind": "StageError", "reason": "CUDA error", "hint": "read the job log"},
              "model": {"path": "out/train/adapter", "kind": "adapter"}, "baseline": {"kind": "none"},
              "metrics": {}, "tasks": {},
              "gates": [{"metric": "t/acc", "rule": "≥ 0.5", "value": None, "baseline": None, "passed": False,
                         "reason": "evaluation could not run: CUDA error"}]}
    md = render_markdown(report)
    assert "❌ **FAIL** — evaluation could not run: CUDA error" in md
    assert "| `t/acc` | — | — | — | ≥ 0.5 — evaluation could not run: CUDA error | ❌ |" in md
