"""`swiftci comment`: ONE sticky pull-request comment per (workflow, config), edited in place on every push.

The comment is found by a hidden marker, shows each stage's status, the eval table, the loss curve (mermaid) and a
link to the run. Outside pull requests only the job summary is written. GitHub's REST API is called through
`requests` with urllib3 retries (5xx, 429 and Retry-After); a 403 — e.g. a fork's read-only token — is a warning,
never a failed pipeline.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from swiftci import diff, ghactions, guard, preference, reports, runinfo, stages
from swiftci.config import Config
from swiftci.errors import StageError, UsageError
from swiftci.notify import Redactor

GITHUB_LIMIT = 65536
TRUNCATE_AT = 60000
PASSED = {status for stage in stages.STAGES for status in stage.passed}
FAILED = {status for stage in stages.STAGES for status in stage.failed}
ICONS = {**{s: "✅" for s in PASSED}, **{s: "❌" for s in FAILED}, stages.RUNNING: "⏳", "pending": "⏳",
         "skipped": "skipped", "missing": "⚠️ no report"}
MAX_RATE_LIMIT_WAIT = 60


@dataclass
class Posted:
    action: str  # "created" | "updated" | "summary-only" | "skipped"
    comment_id: int | None = None
    url: str | None = None
    warning: str | None = None


def marker(cfg: Config) -> str:
    workflow = os.environ.get("GITHUB_WORKFLOW", "local")
    return f"<!-- swiftci-sticky-comment workflow={json.dumps(workflow)} config={json.dumps(cfg.source)} -->"


# --- the body --------------------------------------------------------------------------------------------------


def stage_states(cfg: Config, final: bool) -> dict[str, tuple[str, dict | None]]:
    """stage -> (state, report). A configured stage without a report of THIS run (its run id is the train stage's)
    is pending while the run goes on; once it is over, `missing` — except deploy, which pull requests never run."""
    states: dict[str, tuple[str, dict | None]] = {}
    for stage in stages.NAMES:
        # a report left over from an earlier run in the same folder is not this run's result
        report = stages.this_runs_report(cfg, stage) if getattr(cfg, stage, None) is not None else None
        if getattr(cfg, stage, None) is None:
            states[stage] = ("skipped", None)
        elif report is not None:
            states[stage] = (report.get("status", "error"), report)
        elif not final:
            states[stage] = ("pending", None)
        elif stage == "deploy" or any(state in FAILED for state, _ in states.values()):
            states[stage] = ("skipped", None)  # not run: an earlier stage failed, or a pull request
        else:
            states[stage] = ("missing", None)
    return states


def _cell(text: str, redact: Redactor, limit: int = 240) -> str:
    """Text from a report made safe for one table cell: no secrets or local paths, no line breaks, no column
    separators, no markup that renders (an error message can quote anything, also a pull request's own data)."""
    text = " ".join(str(redact(text)).split())
    text = text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return text if len(text) <= limit else text[: limit - 1] + "…"


_MENTION = re.compile(r"(?<![\w`])@(?=[A-Za-z0-9])")


def _inert(markdown: str) -> str:
    """A stage's Markdown report as it enters the comment: its tables and charts render, but nothing in it can be
    HTML (an error message can quote anything, also a pull request's own data) or ping someone (`@team`)."""
    return _MENTION.sub("@\u200b", markdown.replace("<", "&lt;"))


def _detail(stage: str, report: dict | None) -> str:
    if report is None:
        return ""
    m = report.get("metrics") or {}
    if stage == "train":
        if report.get("status") != "ok":
            return stages.failure_reason(report)
        first, last = m.get("train_loss_first"), m.get("train_loss_last")
        loss = f"loss {first:.4g} → {last:.4g}" if first is not None and last is not None else ""
        tps = f"{m['tokens_per_second']:,.0f} tok/s" if m.get("tokens_per_second") else ""
        rewards = preference.summary(m) or ""
        return " · ".join(p for p in (loss, rewards, f"{m.get('steps')} steps", tps, f"run `{report.get('run_id')}`")
                          if p)
    if stage == "evaluate":
        gates = report.get("gates") or []
        if report.get("status") == "error":
            return f"could not run: {stages.failure_reason(report)}"
        return f"{sum(g['passed'] for g in gates)}/{len(gates)} gates passed" if gates else "no gates"
    if stage == "quantize":
        parts = []
        if m.get("size_ratio") is not None:
            parts.append(f"size ×{m['size_ratio']:.2f}")
        if m.get("perplexity_increase_pct") is not None:
            parts.append(f"perplexity {m['perplexity_increase_pct']:+.2f}%")
        return " · ".join(parts) or stages.failure_reason(report)
    if stage == "deploy":
        rollout = report.get("rollout") if isinstance(report.get("rollout"), dict) else {}
        smoke = report.get("smoke") or {}
        parts = [f"image `{report['image_digest'][:19]}…`" if report.get("image_digest") else "",
                 f"rollout: {rollout['result']}" if rollout.get("result") else "",
                 f"canary {report['canary'].get('result')}" if report.get("canary") else "",
                 (f"smoke {sum(r['passed'] for r in smoke['results'])}/{len(smoke['results'])}"
                  if smoke.get("results") else ""),
                 stages.failure_reason(report)]
        return " · ".join(p for p in parts if p)
    return ""


def build_body(cfg: Config, *, final: bool, since: Path | None = None) -> str:
    states = stage_states(cfg, final)
    failed = [s for s, (state, _) in states.items() if state in FAILED]
    pending = [s for s, (state, _) in states.items() if state in ("pending", "running")]
    missing = [s for s, (state, _) in states.items() if state == "missing"]
    verdict = ("❌ failed" if failed else "⏳ running" if pending
               else f"⚠️ incomplete: no {', '.join(missing)} report" if missing else "✅ passed")
    redact = Redactor(list(cfg.env_values))
    lines = [marker(cfg), f"## swiftci · `{cfg.name}` · {verdict}", "",
             "| stage | status | details |", "|---|:-:|---|"]
    for stage, (state, report) in states.items():
        lines.append(f"| {stage} | {ICONS.get(state, state)} | {_cell(_detail(stage, report), redact)} |")
    for stage in stages.NAMES[1:]:
        summary = stages.summary(cfg, stage)
        if summary and states[stage][1] is not None:
            lines += ["", _inert(redact(summary.strip()))]
    if since is not None:  # the last green run's folder: its reports' figures and its record, compared
        if (since / "train").is_dir() or (since / "evaluate").is_dir():
            lines += ["", guard.markdown(guard.compare(cfg, since)).rstrip()]
        changed = diff.since_last_green(cfg.output_path, since)
        if changed:
            lines += ["", "<details><summary>What changed since the last green run on the default branch</summary>",
                      "", _inert(redact(changed.split("\n", 2)[2].strip())), "", "</details>"]
    records = reports.read_jsonl(cfg.stage_dir("train") / "loss.jsonl")
    chart = reports.loss_chart(records)
    if chart:
        lines += ["", "<details><summary>Loss curve</summary>", "", chart, "", "</details>"]
    footer = []
    url = runinfo.run_url()
    if url:
        footer.append(f"[workflow run]({url})")
    branch = os.environ.get("GITHUB_HEAD_REF") or os.environ.get("GITHUB_REF_NAME")
    if branch:  # attacker-controlled on pull requests: shown as inert code, never interpreted
        footer.append("branch `" + branch.replace("`", "'").replace("\n", " ")[:100] + "`")
    sha = os.environ.get("GITHUB_SHA")
    if sha:
        footer.append(f"commit `{sha[:7]}`")
    footer.append(f"updated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    lines += ["", "<sub>" + " · ".join(footer) + "</sub>"]
    return "\n".join(lines) + "\n"


def fit(body: str) -> str:
    """Cut a body over GitHub's 65,536-character limit, pointing readers to the job summary."""
    if len(body) <= GITHUB_LIMIT:
        return body
    url = runinfo.run_url()
    note = ("\n\n… the report was cut to fit GitHub's comment size limit; the full report is in the job summary"
            + (f" of the [workflow run]({url})" if url else "") + ".\n")
    cut = body[:TRUNCATE_AT]
    cut = cut[: cut.rfind("\n")] if "\n" in cut else cut
    if cut.count("```") % 2:  # do not leave a code fence open
        cut += "\n```"
    return cut + note


# --- GitHub's REST API -----------------------------------------------------------------------------------------


def _session(token: str):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(total=5, connect=3, read=3, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None, respect_retry_after_header=True, raise_on_status=False)
    s = requests.Session()
    s.mount("https://", HTTPAdapter(max_retries=retry))
    s.mount("http://", HTTPAdapter(max_retries=retry))
    s.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
                      "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "swiftci"})
    return s


class _Forbidden(Exception):
    pass


def _call(session, method: str, url: str, **kwargs):
    import requests

    for _ in range(2):  # at most one wait for a primary rate limit reset
        try:
            resp = session.request(method, url, timeout=(5, 30), **kwargs)
        except requests.RequestException as e:
            raise StageError(f"GitHub API unreachable ({method} {url}): {type(e).__name__}") from None
        if resp.status_code == 403 and resp.headers.get("x-ratelimit-remaining") == "0":
            wait = int(resp.headers.get("x-ratelimit-reset", "0")) - int(time.time())
            if 0 <= wait <= MAX_RATE_LIMIT_WAIT:
                time.sleep(wait + 1)
                continue
        break
    if resp.status_code == 403:
        raise _Forbidden(resp.json().get("message", "forbidden") if resp.content else "forbidden")
    if resp.status_code >= 400:
        raise StageError(f"GitHub API {method} {url} answered {resp.status_code}: {resp.text[:300]}")
    return resp


def post(body: str, *, repo: str, pr: int, token: str, api_url: str, mark: str) -> Posted:
    session = _session(token)
    base = api_url.rstrip("/")
    try:
        marked = []
        url = f"{base}/repos/{repo}/issues/{pr}/comments?per_page=100"
        while url:
            resp = _call(session, "GET", url)
            # ours start with the marker; a comment that merely quotes it (a reply, a person's paste) does not
            marked += [c for c in resp.json() if (c.get("body") or "").startswith(mark)]
            url = resp.links.get("next", {}).get("url")
        mine = _ours(session, base, marked)
        if mine:
            keep = min(mine, key=lambda c: c["id"])
            resp = _call(session, "PATCH", f"{base}/repos/{repo}/issues/comments/{keep['id']}", json={"body": body})
            for extra in mine:  # a retried create can leave a duplicate: heal it
                if extra["id"] != keep["id"]:
                    _call(session, "DELETE", f"{base}/repos/{repo}/issues/comments/{extra['id']}")
            return Posted("updated", keep["id"], resp.json().get("html_url"))
        resp = _call(session, "POST", f"{base}/repos/{repo}/issues/{pr}/comments", json={"body": body})
        return Posted("created", resp.json().get("id"), resp.json().get("html_url"))
    except _Forbidden as e:
        return Posted("skipped", warning=f"GitHub refused the comment (403: {e}); a fork's pull request gets a "
                                         "read-only token — the report is in the job summary")


def _ours(session, base: str, marked: list[dict]) -> list[dict]:
    """The marked comments this token's own identity wrote; nobody else's is ever edited or deleted. A personal
    token is a user whose login `GET /user` tells; an installation token (GITHUB_TOKEN, a GitHub App) gets a 403
    there and comments as its bot: github-actions[bot] for GITHUB_TOKEN, or SWIFTCI_COMMENT_AUTHOR for an app."""
    if not marked:
        return []
    try:
        login = _call(session, "GET", f"{base}/user").json().get("login")
    except _Forbidden:
        login = os.environ.get("SWIFTCI_COMMENT_AUTHOR") or "github-actions[bot]"
    return [c for c in marked if login and (c.get("user") or {}).get("login") == login]


def pull_request_number() -> int | None:
    """The PR of this run, from the event payload (pull_request and pull_request_target events)."""
    event_path = os.environ.get("GITHUB_EVENT_PATH")
    if not event_path or not Path(event_path).is_file():
        return None
    event = json.loads(Path(event_path).read_text(encoding="utf-8"))
    pr = event.get("pull_request") or {}
    number = pr.get("number") or event.get("number")
    return int(number) if number else None


def run(cfg: Config, *, pr: int | None = None, repo: str | None = None, final: bool = True,
        since: Path | None = None) -> Posted:
    full = build_body(cfg, final=final, since=since)
    body = fit(full)
    reports.write_text(cfg.output_path / "comment.md", body)
    ghactions.append_summary(full.split("\n", 1)[1])  # the whole report, without the hidden marker
    pr = pr or pull_request_number()
    if pr is None:
        return Posted("summary-only")
    repo = repo or os.environ.get("GITHUB_REPOSITORY")
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
    if not repo:
        raise UsageError("comment: no repository; pass --repo OWNER/NAME or set GITHUB_REPOSITORY")
    if not token:
        return Posted("skipped", warning="no GITHUB_TOKEN in the environment, so no pull request comment "
                                         "(give the step `env: GITHUB_TOKEN: ${{ github.token }}`)")
    api_url = os.environ.get("GITHUB_API_URL", "https://api.github.com")
    return post(body, repo=repo, pr=pr, token=token, api_url=api_url, mark=marker(cfg))
