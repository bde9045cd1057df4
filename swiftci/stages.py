"""What the rest of swiftci knows about stages, in one place: their names and order, the report each writes, what
its statuses mean, the one shape of a failure, and which model a finished stage handed on.

Stages meet only through their output folders (`<output_dir>/<stage>/`) and these versioned reports: no stage
imports another stage to learn where its outputs lie or whether it passed. Every report is

    {"version": 2, "stage": <name>, "status": <one of the stage's statuses>, "run_id": <the train stage's run id>,
     "outputs": {<kind>: <path relative to the stage folder>}, ...,
     "error": {"kind": <error class>, "reason": <what went wrong>, "hint": <how to fix it>}  # only on failure}

Version 2 (this one) moved every failure into `error`; version 1 had `error.reason` in train, `error` (a string)
in evaluate and `reason` in quantize and deploy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from swiftci import reports
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


def read_report(cfg: Config, name: str) -> dict | None:
    """A stage's report, or None when there is none (or it cannot be read: a half-written file never exists, since
    reports are replaced atomically, but a user may have edited one)."""
    try:
        report = reports.read_json(report_path(cfg, name))
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


# --- the model a stage handed on -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Produced:
    """A model folder a finished stage wrote: `kind` is `adapter` (LoRA) or `model` (a full or merged model)."""

    path: Path
    kind: str
    run_id: str | None


def produced(cfg: Config, name: str, prefer: tuple[str, ...] = ("model", "adapter")) -> Produced:
    """The model folder stage `name` handed on, the first of `prefer` it wrote. Raises StageError when the stage
    has not finished (no report, or one that did not pass) or wrote none of them."""
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
            return Produced(cfg.stage_dir(name) / outputs[kind], kind, report.get("run_id"))
    raise StageError(f"the {name} stage wrote no {' or '.join(prefer)} (its outputs: {', '.join(outputs) or 'none'})")
