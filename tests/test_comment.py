"""`swiftci comment` against a local fake of GitHub's REST API (tests/fakes/github_api.py): one sticky comment,
edited in place; retries on 5xx and rate limits; 403 is a warning; bodies over GitHub's limit are cut."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from conftest import TINY, read_json, swiftci_in_process, tiny_config, write_config
from fakes.github_api import FakeGitHub
from swiftci import comment

TOKEN = "ghs_fake_token_for_tests_0123456789"
BOT = {"login": "github-actions[bot]", "type": "Bot"}
RUN_ID = "support-bot-sft-20261123-1a2b3c4"  # the golden eval report's run


@pytest.fixture
def project(tiny_model, tmp_path):
    """A config whose output folder holds a finished train and evaluate stage (reports only, no model)."""
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out"))
    (tmp_path / "out/train").mkdir(parents=True)
    (tmp_path / "out/evaluate").mkdir(parents=True)
    (tmp_path / "out/train/train_report.json").write_text(json.dumps({
        "version": 1, "stage": "train", "status": "ok", "run_id": RUN_ID,
        "metrics": {"train_loss_first": 6.2, "train_loss_last": 0.35, "steps": 375, "tokens_per_second": 21000}}))
    (tmp_path / "out/train/loss.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 6.0 / (1 + s / 25)}) + "\n" for s in range(1, 376, 25)))
    golden = TINY.parent.parent / "tests/golden"
    (tmp_path / "out/evaluate/eval_report.json").write_text((golden / "eval_report.json").read_text())
    (tmp_path / "out/evaluate/eval_report.md").write_text((golden / "eval_report.md").read_text())
    return cfg


@pytest.fixture
def github(httpserver, monkeypatch, tmp_path):
    fake = FakeGitHub(token=TOKEN)
    api = fake.install(httpserver)
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"number": 7, "pull_request": {"number": 7}}))
    summary = tmp_path / "summary.md"
    for key, value in {"GITHUB_API_URL": api, "GITHUB_TOKEN": TOKEN, "GITHUB_REPOSITORY": "acme/model-repo",
                       "GITHUB_EVENT_PATH": str(event), "GITHUB_WORKFLOW": "swiftci pull request",
                       "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_SERVER_URL": "https://github.com",
                       "GITHUB_RUN_ID": "4242", "GITHUB_HEAD_REF": "feat/x`; rm -rf /"}.items():
        monkeypatch.setenv(key, value)
    fake.summary = summary
    return fake


def run_comment(cfg, *args):
    return swiftci_in_process("comment", "-c", str(cfg), *args)


def test_first_run_creates_second_run_edits_the_same_comment(project, github):
    first = run_comment(project)
    assert first.returncode == 0, first.stderr
    assert "comment: created" in first.stdout
    (only,) = github.for_pr(7)
    body = only["body"]
    assert 'workflow="swiftci pull request"' in body.splitlines()[0]
    assert "| train | ✅ | loss 6.2 → 0.35 · 375 steps · 21,000 tok/s" in body
    assert "| evaluate | ❌ | 2/3 gates passed |" in body
    assert "| `gsm8k/exact_match,strict-match` | 0.5588 | 0.5421 |" in body  # the eval table
    assert "xychart-beta" in body and "[workflow run](https://github.com/acme/model-repo/actions/runs/4242)" in body
    assert "branch `feat/x'; rm -rf /`" in body

    second = run_comment(project)
    assert second.returncode == 0 and "comment: updated" in second.stdout
    assert len(github.for_pr(7)) == 1
    # list, create; list, ask who the token is (403: the Actions bot), edit
    assert [m for m, _ in github.requests] == ["GET", "POST", "GET", "GET", "PATCH"]
    assert "## swiftci · `tiny-reverse` · ❌ failed" in github.summary.read_text()


def test_pending_stages_while_the_run_is_in_progress(project, github, tmp_path):
    (tmp_path / "out/evaluate/eval_report.json").unlink()
    run_comment(project, "--in-progress")
    assert "| evaluate | ⏳ |  |" in github.for_pr(7)[0]["body"]
    run_comment(project)
    body = github.for_pr(7)[0]["body"]
    assert "| evaluate | ⚠️ no report |  |" in body, "a configured stage that left no report is not a pass"
    assert "· ⚠️ incomplete: no evaluate, quantize report" in body.splitlines()[1]


def test_a_report_from_an_earlier_run_is_not_this_runs_result(project, github, tmp_path):
    report = read_json(tmp_path / "out/evaluate/eval_report.json")
    report.update(run_id="support-bot-sft-20261101-0000000", status="passed")
    (tmp_path / "out/evaluate/eval_report.json").write_text(json.dumps(report))
    run_comment(project)
    body = github.for_pr(7)[0]["body"]
    assert "| evaluate | ⚠️ no report |" in body and "✅ passed" not in body


def test_report_text_is_made_safe_for_the_table(project, github, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN_FOR_TEST", "s3cr3t-value-from-env")
    cfg = read_json(tmp_path / "out/train/train_report.json")
    cfg.update(status="failed", error={"reason": "OOM loading /home/runner/work/data/private.jsonl\n| x | "
                                                 "<img src=x> token s3cr3t-value-from-env"})
    (tmp_path / "out/train/train_report.json").write_text(json.dumps(cfg))
    doc = yaml.safe_load(project.read_text())
    doc["owner"] = "${HF_TOKEN_FOR_TEST}"  # any value that came from the environment is a secret
    write_config(project, doc)
    run_comment(project)
    (row,) = [line for line in github.for_pr(7)[0]["body"].splitlines() if line.startswith("| train |")]
    assert row == "| train | ❌ | OOM loading private.jsonl \\| x \\| &lt;img src=x&gt; token ••• |", row


def test_a_persons_comment_with_the_marker_is_never_touched(project, github):
    github.next_id += 1
    quoted = comment.marker(_cfg(project)) + "\n> the bot says it failed, why?"
    github.comments[github.next_id] = {"id": github.next_id, "pr": 7, "repo": "acme/model-repo", "body": quoted,
                                       "user": {"login": "alice", "type": "User"}}
    assert run_comment(project).returncode == 0
    assert run_comment(project).returncode == 0
    people, bots = ([c for c in github.for_pr(7) if c["user"]["type"] == kind] for kind in ("User", "Bot"))
    assert [c["body"] for c in people] == [quoted] and len(bots) == 1


def test_a_bot_comment_that_quotes_the_marker_or_another_bots_is_never_touched(project, github):
    """Only a comment by the token's own identity whose body STARTS with the marker is ours: a bot's reply quoting
    it, or another app's comment, stays as it is."""
    mark = comment.marker(_cfg(project))
    others = [("> " + mark + "\nquoted by the bot", BOT), (mark + "\nfrom another app", {"login": "other-app[bot]",
                                                                                          "type": "Bot"})]
    for body, user in others:
        github.next_id += 1
        github.comments[github.next_id] = {"id": github.next_id, "pr": 7, "repo": "acme/model-repo", "body": body,
                                           "user": user}
    assert "comment: created" in run_comment(project).stdout
    assert "comment: updated" in run_comment(project).stdout
    bodies = [c["body"] for c in github.for_pr(7)]
    assert bodies[:2] == [body for body, _ in others] and len(bodies) == 3 and bodies[2].startswith(mark)


def test_stage_reports_enter_the_comment_redacted_and_inert(project, github, monkeypatch):
    monkeypatch.setenv("SWIFTCI_TEST_SECRET", "s3cr3t-value-for-the-comment")
    doc = yaml.safe_load(project.read_text())
    doc["notify"] = {"discord": {"webhook": "https://discord.com/api/webhooks/${SWIFTCI_TEST_SECRET}"}}
    write_config(project, doc)
    md = project.parent / "out/evaluate/eval_report.md"
    md.write_text(md.read_text() + "\nfailed on <img src=x onerror=alert(1)> for @acme/ml-team, key "
                  "s3cr3t-value-for-the-comment, data /home/runner/private/train.jsonl\n")
    assert run_comment(project).returncode == 0
    body = github.for_pr(7)[0]["body"]
    assert "<img" not in body and "&lt;img src=x onerror=alert(1)>" in body
    assert "@acme/ml-team" not in body and "@\u200bacme/ml-team" in body
    assert "s3cr3t-value-for-the-comment" not in body and "/home/runner/private" not in body
    assert "| metric | baseline | candidate |" in body, "the tables still render"


def test_with_a_personal_token_its_own_comment_is_edited(project, github):
    github.identity = {"login": "release-bot-user", "type": "User"}
    assert "comment: created" in run_comment(project).stdout
    github.next_id += 1
    github.comments[github.next_id] = {"id": github.next_id, "pr": 7, "repo": "acme/model-repo",
                                       "body": comment.marker(_cfg(project)), "user": {"login": "bob", "type": "User"}}
    assert "comment: updated" in run_comment(project).stdout
    assert [c["user"]["login"] for c in github.for_pr(7)] == ["release-bot-user", "bob"]


def test_5xx_is_retried(project, github):
    github.fail_next = [(502, {}), (503, {})]
    proc = run_comment(project)
    assert proc.returncode == 0, proc.stderr
    assert len(github.for_pr(7)) == 1


def test_secondary_rate_limit_retry_after_is_respected(project, github):
    github.fail_next = [(429, {"Retry-After": "1"})]
    t0 = time.monotonic()
    proc = run_comment(project)
    assert proc.returncode == 0 and len(github.for_pr(7)) == 1
    assert time.monotonic() - t0 >= 1.0


def test_primary_rate_limit_waits_for_the_reset(project, github):
    reset = str(int(time.time()) + 1)
    github.fail_next = [(403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset})]
    proc = run_comment(project)
    assert proc.returncode == 0 and len(github.for_pr(7)) == 1


def test_403_is_a_warning_not_a_failure(project, github):
    github.fail_next = [(403, {})]
    proc = run_comment(project)
    assert proc.returncode == 0
    assert "warning: GitHub refused the comment (403" in proc.stderr
    assert github.for_pr(7) == []
    assert "swiftci" in github.summary.read_text(), "the report still reaches the job summary"


def test_unreachable_api_is_exit_3(project, github, monkeypatch):
    monkeypatch.setenv("GITHUB_API_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    proc = run_comment(project)
    assert proc.returncode == 3 and "GitHub API unreachable" in proc.stderr


def test_duplicates_from_a_retried_create_are_healed(project, github):
    for _ in range(2):
        github.next_id += 1
        github.comments[github.next_id] = {"id": github.next_id, "pr": 7, "repo": "acme/model-repo",
                                           "body": comment.marker(_cfg(project)) + "\nold", "user": BOT}
    github.page_size = 1  # and the list is paginated
    run_comment(project)
    (only,) = github.for_pr(7)
    assert "old" not in only["body"]


def test_other_workflows_and_configs_get_their_own_comment(project, github, monkeypatch):
    run_comment(project)
    monkeypatch.setenv("GITHUB_WORKFLOW", "nightly")
    run_comment(project)
    assert len(github.for_pr(7)) == 2


def test_outside_pull_requests_only_the_job_summary(project, github, monkeypatch, tmp_path):
    (tmp_path / "push.json").write_text(json.dumps({"ref": "refs/heads/main"}))
    monkeypatch.setenv("GITHUB_EVENT_PATH", str(tmp_path / "push.json"))
    proc = run_comment(project)
    assert proc.returncode == 0 and "comment: summary-only" in proc.stdout
    assert github.requests == []
    assert "| train | ✅ |" in github.summary.read_text()


def test_body_over_githubs_limit_is_cut_with_a_pointer(project, github, tmp_path):
    report = read_json(tmp_path / "out/evaluate/eval_report.json")
    report["metrics"]["huge"] = {f"m{i}": {"value": 0.5, "stderr": 0.01, "baseline": 0.5, "baseline_stderr": 0.01,
                                           "delta": 0.0} for i in range(3000)}
    (tmp_path / "out/evaluate/eval_report.json").write_text(json.dumps(report))
    from swiftci.evaluate import render_markdown

    (tmp_path / "out/evaluate/eval_report.md").write_text(render_markdown(report))
    run_comment(project)
    body = github.for_pr(7)[0]["body"]
    assert len(body) <= comment.GITHUB_LIMIT
    assert "the full report is in the job summary of the [workflow run](" in body
    assert len(github.summary.read_text()) > comment.GITHUB_LIMIT, "the job summary keeps everything"


def _cfg(path):
    from swiftci import config

    return config.load(path)
