"""The last green run on the default branch, fetched for the regression guard: its report artifacts, unpacked into
a folder laid out like an output folder (`<folder>/train/train_report.json`, `<folder>/evaluate/…`), so that
`swiftci guard --against` and the sticky comment compare this run with it.

Found through GitHub's REST API with the job's own token (`actions: read`): the newest successful `push` run on the
default branch that uploaded this config's reports (`swiftci-reports-<stage>-<name>-…`, what the reusable
pipeline uploads). Each artifact's zip is checked against the sha256 digest GitHub recorded at upload before
anything is unpacked, and only its JSON reports are taken (no paths outside the folder, nothing large). The
reports are figures to compare, never code or models: nothing from that run is loaded or run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from swiftci import reports, stages
from swiftci.errors import StageError, UsageError

VERSION = 1
ARTIFACT_PREFIX = "swiftci-reports-"
RUNS_SEARCHED = 30  # the newest successful push runs looked at; older green runs are stale baselines anyway
MAX_REPORT_BYTES = 5 * 2**20  # a report is a few kB; a bigger member is not one of ours
RECORD = "last_green.json"


@dataclass
class LastGreen:
    """What was fetched: which run, its commit and link, and each artifact with the digest it was checked against."""

    run_id: int
    head_sha: str
    branch: str
    url: str | None
    created_at: str | None
    artifacts: list[dict] = field(default_factory=list)  # {name, stage, digest, files}


def fetch(dest: Path, *, name: str, repo: str, token: str, api_url: str, branch: str | None = None,
          exclude_run: str | None = None) -> LastGreen | None:
    """Unpack the reports of the newest green run of config `name` into `dest`; None when there is none yet.

    `dest` is replaced only once everything was downloaded and verified, so a failure leaves no half-filled folder.
    """
    from swiftci import comment  # GitHub's REST API: the session and retries the sticky comment uses

    session = comment._session(token)
    base = api_url.rstrip("/")
    branch = branch or _default_branch(comment, session, base, repo)
    for run in _green_runs(comment, session, base, repo, branch):
        if exclude_run and str(run["id"]) == str(exclude_run):
            continue  # this very run, when it is a push run that is still going
        artifacts = _report_artifacts(comment, session, base, repo, run["id"], name)
        if "train" not in artifacts:
            continue  # a green run of another config, or one that skipped training
        found = LastGreen(run_id=run["id"], head_sha=run.get("head_sha", ""), branch=branch,
                          url=run.get("html_url"), created_at=run.get("created_at"))
        staging = dest.with_name(f".{dest.name}.partial")
        _clear(staging)
        for stage, artifact in sorted(artifacts.items()):
            data = _download(comment, session, base, repo, artifact)
            files = _unpack(data, staging / stage, artifact["name"])
            found.artifacts.append({"name": artifact["name"], "stage": stage, "digest": artifact.get("digest"),
                                    "files": files})
        reports.write_json(staging / RECORD, {"version": VERSION, **asdict(found)})
        _clear(dest)
        os.replace(staging, dest)
        return found
    return None


def _default_branch(comment, session, base: str, repo: str) -> str:
    return comment._call(session, "GET", f"{base}/repos/{repo}").json()["default_branch"]


def _green_runs(comment, session, base: str, repo: str, branch: str) -> list[dict]:
    resp = comment._call(session, "GET", f"{base}/repos/{repo}/actions/runs",
                         params={"branch": branch, "status": "success", "event": "push",
                                 "per_page": RUNS_SEARCHED})
    runs = resp.json().get("workflow_runs") or []
    return sorted(runs, key=lambda r: (r.get("created_at") or "", r["id"]), reverse=True)


def _report_artifacts(comment, session, base: str, repo: str, run_id: int, name: str) -> dict[str, dict]:
    """stage -> artifact for `swiftci-reports-<stage>-<name>-…` artifacts of one run (expired ones left out)."""
    resp = comment._call(session, "GET", f"{base}/repos/{repo}/actions/runs/{run_id}/artifacts",
                         params={"per_page": 100})
    found: dict[str, dict] = {}
    for artifact in resp.json().get("artifacts") or []:
        if artifact.get("expired"):
            continue
        for stage in stages.NAMES:
            if artifact["name"].startswith(f"{ARTIFACT_PREFIX}{stage}-{name}-"):
                found[stage] = artifact
    return found


def _download(comment, session, base: str, repo: str, artifact: dict) -> bytes:
    """The artifact's zip, checked against the sha256 GitHub recorded when it was uploaded."""
    resp = comment._call(session, "GET", f"{base}/repos/{repo}/actions/artifacts/{artifact['id']}/zip")
    data = resp.content
    digest = artifact.get("digest")
    if not digest:
        raise StageError(f"artifact {artifact['name']}: GitHub records no digest for it (uploaded before "
                         "actions/upload-artifact v4.4), so its bytes cannot be verified; it was not used")
    algorithm, _, expected = digest.partition(":")
    if algorithm != "sha256" or hashlib.sha256(data).hexdigest() != expected:
        raise StageError(f"artifact {artifact['name']}: downloaded bytes do not match the digest GitHub recorded "
                         f"at upload ({digest}); it was not used")
    return data


def _unpack(data: bytes, folder: Path, artifact: str) -> list[str]:
    """Only the JSON reports, each at most MAX_REPORT_BYTES, none outside `folder`."""
    taken = []
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise StageError(f"artifact {artifact}: not a zip file") from None
    for member in archive.infolist():
        path = PurePosixPath(member.filename)
        if member.is_dir() or path.suffix != ".json":
            continue
        if path.is_absolute() or ".." in path.parts:
            raise StageError(f"artifact {artifact}: refuses the member {member.filename!r} (outside its folder)")
        if member.file_size > MAX_REPORT_BYTES:
            raise StageError(f"artifact {artifact}: {member.filename} is {member.file_size} bytes, more than a "
                             "report; it was not used")
        body = archive.read(member)
        try:
            json.loads(body)
        except ValueError:
            raise StageError(f"artifact {artifact}: {member.filename} is not JSON") from None
        target = folder.joinpath(*path.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        taken.append(str(path))
    return sorted(taken)


def _clear(folder: Path) -> None:
    import shutil

    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)


def from_environment(dest: Path, name: str, *, branch: str | None = None) -> LastGreen | None:
    """`fetch` with what a GitHub Actions job knows: GITHUB_REPOSITORY, GITHUB_API_URL, GITHUB_TOKEN (or GH_TOKEN),
    and this run's id, which is never its own baseline."""
    repo = os.environ.get("GITHUB_REPOSITORY")
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
    missing = [k for k, v in (("GITHUB_REPOSITORY", repo), ("GITHUB_TOKEN", token)) if not v]
    if missing:
        raise UsageError(f"the last green run is looked up through GitHub's API: set {' and '.join(missing)} "
                         "(in a workflow: `env: GITHUB_TOKEN: ${{ github.token }}` and `permissions: actions: read`)")
    return fetch(dest, name=name, repo=repo, token=token,
                 api_url=os.environ.get("GITHUB_API_URL", "https://api.github.com"), branch=branch,
                 exclude_run=os.environ.get("GITHUB_RUN_ID"))
