"""What the rest of swiftci knows about stages, in one place: their names and order, the report each writes, what
its statuses mean, the one shape of a failure, and which model a finished stage handed on.

Stages meet only through their output folders (`<output_dir>/<stage>/`) and these versioned reports: no stage
imports another stage to learn where its outputs lie or whether it passed. Every report is

    {"version": 2, "stage": <name>, "status": <one of the stage's statuses>, "run_id": <the train stage's run id>,
     "outputs": {<kind>: <path relative to the stage folder>}, ...,
     "files": {<path>: <sha256>}, "files_sha256": <digest of files>,  # what the stage hands on, bound by content
     "error": {"kind": <error class>, "reason": <what went wrong>, "hint": <how to fix it>}  # only on failure}

Version 2 (this one) moved every failure into `error`; version 1 had `error.reason` in train, `error` (a string)
in evaluate and `reason` in quantize and deploy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from swiftci import reports
from swiftci.data import sha256_file
from swiftci.errors import StageError, SwiftCIError, hint_for

if TYPE_CHECKING:
    from swiftci.config import Config

RUNNING = "running"


@dataclass(frozen=True)
class Stage:
    name: str
    report: str  # the JSON report in the stage's folder
    markdown: str  # the same for people (job summary, pull-request comment)
    passed: tuple[str, ...]  # statuses after which the pipeline goes on
    failed: tuple[str, ...]  # statuses that fail the pipeline


TRAIN = Stage("train", "train_report.json", "train_report.md", passed=("ok",), failed=("failed",))
EVALUATE = Stage("evaluate", "eval_report.json", "eval_report.md", passed=("passed",), failed=("failed", "error"))
QUANTIZE = Stage("quantize", "quantize_report.json", "quantize_report.md", passed=("passed",),
                 failed=("failed", "error"))
DEPLOY = Stage("deploy", "deploy_report.json", "deploy_report.md",
               passed=("deployed", "unchanged", "served", "dry_run", "rolled_back_by_request"),
               failed=("failed", "rolled_back", "canary_aborted"))
STAGES = (TRAIN, EVALUATE, QUANTIZE, DEPLOY)
NAMES = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    return _BY_NAME[name]


def configured(cfg: Config) -> list[str]:
    """The stages swiftci.yaml has a section for, in pipeline order."""
    return [s.name for s in STAGES if getattr(cfg, s.name, None) is not None]


def report_path(cfg: Config, name: str) -> Path:
    return cfg.stage_dir(name) / get(name).report


def markdown_path(cfg: Config, name: str) -> Path:
    return cfg.stage_dir(name) / get(name).markdown


def read_report(cfg: Config, name: str, stage_dir: Path | None = None) -> dict | None:
    """A stage's report (from `stage_dir` when given: a step of a chained training), or None when there is none (or
    it cannot be read: a half-written file never exists, since reports are replaced atomically, but a user may have
    edited one)."""
    try:
        report = reports.read_json((stage_dir or cfg.stage_dir(name)) / get(name).report)
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def train_run_id(cfg: Config) -> str | None:
    """The run id in the train stage's report: every later stage, the notifier and the comment name the run by
    it. None when there is no readable report (yet)."""
    run_id = (read_report(cfg, "train") or {}).get("run_id")
    return run_id if isinstance(run_id, str) and run_id else None


def this_runs_report(cfg: Config, name: str) -> dict | None:
    """A later stage's report, or None when it belongs to another run than the train stage's report (left over in
    the same folder, it says nothing about this run's model)."""
    report = read_report(cfg, name)
    run_id = train_run_id(cfg)
    if report is not None and name != "train" and run_id and report.get("run_id") not in (None, run_id):
        return None
    return report


def summary(cfg: Config, name: str) -> str | None:
    """The stage's Markdown report, when it wrote one."""
    path = markdown_path(cfg, name)
    return path.read_text(encoding="utf-8") if path.is_file() else None


def clear(cfg: Config, names: list[str]) -> None:
    """Remove the reports of these stages: a run that stops early must not leave an earlier run's verdict standing
    for the comment or for deploy. Models and checkpoints stay (resume needs them)."""
    for name in names:
        report_path(cfg, name).unlink(missing_ok=True)
        markdown_path(cfg, name).unlink(missing_ok=True)


# --- the failure shape -----------------------------------------------------------------------------------------


def error(reason: str, kind: str, hint: str | None = None, **extra) -> dict:
    """The `error` object of a failed report: what went wrong, and how to fix it."""
    return {"kind": kind, "reason": reason, "hint": hint or hint_for(kind), **extra}


def error_of(e: BaseException) -> dict:
    if isinstance(e, SwiftCIError):
        return error(str(e), e.kind, e.hint)
    return error(f"{type(e).__name__}: {e}", type(e).__name__)


def failure_reason(report: dict | None) -> str:
    """What a failed report says went wrong ("" when it says nothing)."""
    err = (report or {}).get("error")
    return str(err.get("reason") or "") if isinstance(err, dict) else ""


# --- what a stage hands on, bound by content ------------------------------------------------------------------
#
# A stage that hands a model on records the sha256 of every file of it in its report (`files`, paths relative to
# its folder) and one digest of that record (`files_sha256`), which CI passes to later jobs as a job output. A later
# stage loads a folder only when every file in it is in the record with the same hash (`produced` checks), and,
# given the digest from the job output (`--expect`), only when the record is the one that digest names. Files in
# a shared store can be rewritten between jobs; job outputs cannot.


def record_files(stage_dir: Path, folders: list[str]) -> dict[str, str]:
    """{path relative to the stage folder: sha256} of every file in these output folders."""
    return {str(p.relative_to(stage_dir)): sha256_file(p)
            for folder in folders for p in sorted((stage_dir / folder).rglob("*")) if p.is_file()}


def folder_digest(folder: Path) -> str:
    """The digest of one output folder, as its stage's record would give it (paths from the folder's parent)."""
    return files_digest(record_files(folder.parent, [folder.name]))


def files_digest(files: dict[str, str]) -> str:
    """One sha256 for a whole file record (what job outputs carry)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_expected(cfg: Config, expected: dict[str, str]) -> None:
    """Each stage's file record is the one the digest (a CI job output) names; exit 3 otherwise."""
    for name, digest in expected.items():
        report = read_report(cfg, name) if name == "train" else this_runs_report(cfg, name)
        recorded = (report or {}).get("files_sha256")
        if recorded != digest:
            raise StageError(f"{report_path(cfg, name)}: its file record ({(recorded or 'none')[:12]}…) is not the "
                             f"one the {name} job handed on ({digest[:12]}…); the {name} outputs were changed or "
                             "replaced after that job — refusing to use them", kind="ContentMismatch")


def verify(cfg: Config, name: str, folder: Path, stage_dir: Path | None = None) -> str:
    """Every file in `folder` (an output of stage `name`, whose report lies in `stage_dir`, by default the stage's
    folder) is in that stage's record with the same sha256, and nothing recorded is missing. Returns the folder's
    digest; raises StageError (exit 3) naming the file."""
    stage_dir = stage_dir or cfg.stage_dir(name)
    report = read_report(cfg, name, stage_dir) or {}
    recorded = report.get("files")
    if not isinstance(recorded, dict):
        raise StageError(f"{stage_dir / get(name).report} records no file hashes, so {folder} cannot be checked; rerun "
                         f"`swiftci {name}`", kind="ContentMismatch")
    prefix = str(folder.relative_to(stage_dir)) + "/"
    wanted = {k: v for k, v in recorded.items() if k.startswith(prefix)}
    found = record_files(stage_dir, [prefix.rstrip("/")])
    for rel in sorted(set(wanted) | set(found)):
        if rel not in found:
            problem = "is missing"
        elif rel not in wanted:
            problem = "was not written by the stage"
        elif found[rel] != wanted[rel]:
            problem = f"has sha256 {found[rel][:12]}…, not the {wanted[rel][:12]}… the stage recorded"
        else:
            continue
        raise StageError(f"{name}/{rel} {problem}: the file changed after the {name} stage wrote it; refusing to "
                         "load it", kind="ContentMismatch")
    return files_digest(found)


# --- the model a stage handed on -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Produced:
    """A model folder a finished stage wrote: `kind` is `adapter` (LoRA) or `model` (a full or merged model)."""

    path: Path
    kind: str
    run_id: str | None
    sha256: str  # the digest of its files, checked against the stage's record


def produced(cfg: Config, name: str, prefer: tuple[str, ...] = ("model", "adapter")) -> Produced:
    """The model folder stage `name` handed on, the first of `prefer` it wrote, its files checked against the
    stage's record. Raises StageError when the stage has not finished (no report, or one that did not pass), wrote
    none of them, or a file changed since (exit 3, naming the file)."""
    stage = get(name)
    report = read_report(cfg, name) if name == "train" else this_runs_report(cfg, name)
    path = report_path(cfg, name)
    if report is None:
        raise StageError(f"no {name} output: {path} does not exist; run `swiftci {name}` first, or pass --model")
    if report.get("status") not in stage.passed:
        raise StageError(f"the {name} stage did not finish (status {report.get('status')!r} in {path}); there is no "
                         f"model from it")
    outputs = report.get("outputs") or {}
    for kind in prefer:
        if kind in outputs and (cfg.stage_dir(name) / outputs[kind]).is_dir():
            folder = cfg.stage_dir(name) / outputs[kind]
            return Produced(folder, kind, report.get("run_id"), verify(cfg, name, folder))
    remote = report.get("remote")
    if not outputs and isinstance(remote, dict):  # a cluster job (train.launcher: kubernetes) wrote it elsewhere
        raise StageError(f"the {name} stage ran as a cluster job: its model is on volume {remote.get('volume')} at "
                         f"{remote.get('stage_dir')}, not here; run this stage where that volume is mounted (as a "
                         "job in the cluster, or on a runner that mounts it there), or pass --model")
    raise StageError(f"the {name} stage wrote no {' or '.join(prefer)} (its outputs: {', '.join(outputs) or 'none'})")


# --- reruns ------------------------------------------------------------------------------------------------------
#
# A stage's report records the fingerprint of what decided its outputs: its config sections, the content of the
# files they name, and the file record of the model handed to it. A rerun into the same folder can then tell a
# finished run of the same inputs (`swiftci run --reuse` keeps it) from a stale one. Deploy is never reused: it acts
# on a cluster, and finds by itself that the same digest already runs ("unchanged").

REUSABLE = ("train", "evaluate", "quantize")
_DECIDED_BY = {"train": ("model", "data", "train"), "evaluate": ("model", "evaluate"),
               "quantize": ("model", "data", "evaluate", "quantize")}


def fingerprint(cfg: Config, name: str) -> str:
    """The sha256 of what decides stage `name`'s outputs, as this config and these files stand now."""
    from swiftci.config import NOT_DECIDING

    sections = {k: getattr(cfg, k).model_dump(mode="json", exclude=NOT_DECIDING.get(k))
                if getattr(cfg, k) is not None else None for k in _DECIDED_BY[name]}
    files: dict[str, str] = {}
    if cfg.data is not None and "data" in _DECIDED_BY[name]:
        for path in (cfg.data.train, cfg.data.validation):
            if path is not None and cfg.resolve(path).is_file():
                files[str(path)] = sha256_file(cfg.resolve(path))
    ev = cfg.evaluate
    if ev is not None and "evaluate" in _DECIDED_BY[name]:
        if ev.task_dir and cfg.resolve(ev.task_dir).is_dir():  # task YAMLs and their data
            files.update({f"{ev.task_dir}/{k}": v for k, v in record_files(cfg.resolve(ev.task_dir), ["."]).items()})
        if ev.baseline not in ("base", "none") and cfg.resolve(ev.baseline).is_file():
            files[ev.baseline] = sha256_file(cfg.resolve(ev.baseline))
    handed = (read_report(cfg, "train") or {}).get("files_sha256") if name != "train" and cfg.train else None
    blob = {"stage": name, "sections": sections, "files": files, "input": handed}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def reusable(cfg: Config, name: str, stage_dir: Path | None = None, current: str | None = None) -> dict | None:
    """The stage's finished report (in `stage_dir`, by default the stage's folder) when its outputs can stand for
    a rerun: it passed, with the fingerprint this config has now (`current`, when the caller computed it already),
    and the files it handed on are still the bytes it recorded. None otherwise."""
    if name not in REUSABLE:
        return None
    stage_dir = stage_dir or cfg.stage_dir(name)
    report = read_report(cfg, name, stage_dir) if name == "train" else this_runs_report(cfg, name)
    if not report or report.get("status") not in get(name).passed:
        return None
    if report.get("fingerprint") != (current or fingerprint(cfg, name)):
        return None
    for folder in (report.get("outputs") or {}).values():
        try:
            verify(cfg, name, stage_dir / folder, stage_dir)
        except StageError:
            return None
    return report
