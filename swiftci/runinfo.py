"""Who and what a run is: run id, git commit, the link to the run. Shared by every stage's lineage record."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path


def git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(cwd: Path) -> dict:
    """The commit the config was run from: GITHUB_SHA in Actions, else the repository holding the config."""
    sha = os.environ.get("GITHUB_SHA") or git(cwd, "rev-parse", "HEAD")
    dirty = None
    if not os.environ.get("GITHUB_SHA") and sha:
        status = git(cwd, "status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"sha": sha, "dirty": dirty, "repository": os.environ.get("GITHUB_REPOSITORY")}


def run_id(name: str, method: str, cwd: Path, today: dt.date | None = None) -> str:
    """`<name>-<method>-<yyyymmdd>-<short sha>` (`nogit` outside a repository)."""
    sha = git_commit(cwd)["sha"]
    day = (today or dt.datetime.now(dt.timezone.utc).date()).strftime("%Y%m%d")
    return f"{name}-{method}-{day}-{sha[:7] if sha else 'nogit'}"


def run_url() -> str | None:
    """Link to the GitHub Actions run, when running in one."""
    server, repo, rid = (os.environ.get(k) for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID"))
    return f"{server}/{repo}/actions/runs/{rid}" if server and repo and rid else None
