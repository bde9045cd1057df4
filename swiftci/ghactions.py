"""GitHub Actions plumbing: step outputs, the job summary, masking and annotations. Every function is a no-op (or
prints to stdout) outside Actions, so the CLI behaves the same on a laptop."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from swiftci import reports
from swiftci.config import Config

STAGE_REPORTS = {
    "train": ("train_report.json", "train_report.md"),
    "evaluate": ("eval_report.json", "eval_report.md"),
    "quantize": ("quantize_report.json", "quantize_report.md"),
    "deploy": ("deploy_report.json", "deploy_report.md"),
}


def in_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def mask(value: str) -> None:
    """Hide a secret in the rest of the job's log. Values shorter than 6 characters are not masked: masking is a
    substring replacement, and hiding every '8' or 'true' would wreck the log."""
    if in_actions() and value and len(value) >= 6:
        for line in value.splitlines():
            if line.strip():
                print(f"::add-mask::{line}", flush=True)


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def annotate(level: str, message: str, file: str | None = None, line: int | None = None) -> None:
    if not in_actions():
        return
    where = ",".join(p for p in (f"file={file}" if file else "", f"line={line}" if line else "") if p)
    print(f"::{level}{' ' + where if where else ''}::{_escape(message)}", flush=True)


def workspace_relative(path: str) -> str:
    """A path as GitHub wants it in annotations: relative to the repository root ($GITHUB_WORKSPACE)."""
    root = os.environ.get("GITHUB_WORKSPACE")
    if not root:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path


def set_outputs(outputs: dict[str, str]) -> None:
    """Append step outputs to $GITHUB_OUTPUT (heredoc form, safe for multi-line values); print them otherwise."""
    target = os.environ.get("GITHUB_OUTPUT")
    if not target:
        for key, value in outputs.items():
            print(f"{key}={value}")
        return
    with open(target, "a", encoding="utf-8") as f:
        for key, value in outputs.items():
            delimiter = f"swiftci_{secrets.token_hex(8)}"
            f.write(f"{key}<<{delimiter}\n{value}\n{delimiter}\n")


def append_summary(markdown: str) -> bool:
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return False
    with open(target, "a", encoding="utf-8") as f:
        f.write(markdown.rstrip() + "\n\n")
    return True


def stage_outputs(cfg: Config, stage: str) -> dict[str, str]:
    """The documented action outputs of a stage, read from its report (an absent report gives status `missing`)."""
    from swiftci.pipeline import configured_stages

    out_dir = cfg.stage_dir(stage)
    report_path = out_dir / STAGE_REPORTS[stage][0]
    stages = ",".join(configured_stages(cfg))
    if not report_path.is_file():
        return {"status": "missing", "report-path": str(report_path), "passed": "false", "metrics": "{}",
                "model-path": "", "run-id": "", "output-dir": str(cfg.output_path), "stages": stages}
    report = reports.read_json(report_path)
    status = report.get("status", "unknown")
    model_path = ""
    if stage == "train":
        outputs = report.get("outputs") or {}
        chosen = outputs.get("model") or outputs.get("adapter")
        model_path = str(out_dir / chosen) if chosen else ""
        passed = status == "ok"
    elif stage == "evaluate":
        model = (report.get("model") or {}).get("path")
        model_path = str(cfg.resolve(model)) if model and (cfg.resolve(model)).exists() else (model or "")
        passed = bool(report.get("passed"))
    elif stage == "deploy":
        passed = status in ("deployed", "unchanged", "served", "dry_run", "rolled_back_by_request")
    else:
        model_path = str(out_dir / report["model_dir"]) if report.get("model_dir") else ""
        passed = bool(report.get("passed", status in ("ok", "passed")))
    extra = {}
    if stage == "deploy":
        image = report.get("image") or {}
        extra = {"image-digest": image.get("digest") or report.get("image_digest") or "",
                 "image-ref": image.get("ref") or ""}
    return {**extra,
        "status": status,
        "passed": "true" if passed else "false",
        "report-path": str(report_path),
        "model-path": model_path,
        "run-id": report.get("run_id") or "",
        "metrics": json.dumps(report.get("metrics") or {}, separators=(",", ":"), sort_keys=True),
        "output-dir": str(cfg.output_path),
        "stages": stages,
    }


def stage_summary(cfg: Config, stage: str) -> str | None:
    md = cfg.stage_dir(stage) / STAGE_REPORTS[stage][1]
    return md.read_text(encoding="utf-8") if md.is_file() else None
