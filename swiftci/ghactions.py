"""GitHub Actions plumbing: step outputs, the job summary, masking and annotations. Every function is a no-op (or
prints to stdout) outside Actions, so the CLI behaves the same on a laptop."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path

from swiftci import stages
from swiftci.config import Config
from swiftci.errors import StageError

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
    report_path = stages.report_path(cfg, stage)
    common = {"report-path": str(report_path), "output-dir": str(cfg.output_path),
              "stages": ",".join(stages.configured(cfg))}
    report = stages.read_report(cfg, stage)
    if report is None:
        return {"status": "missing", "passed": "false", "metrics": "{}", "model-path": "", "run-id": "",
                "files-sha256": "", **({"store-key": ""} if stage == "train" else {}), **common}
    status = report.get("status", "unknown")
    outputs = {
        "status": status,
        "passed": "true" if status in stages.get(stage).passed else "false",
        "model-path": _model_path(cfg, stage, report),
        "run-id": report.get("run_id") or "",
        "metrics": json.dumps(report.get("metrics") or {}, separators=(",", ":"), sort_keys=True),
        "files-sha256": report.get("files_sha256") or "",
        **common,
    }
    if stage == "train":
        outputs["store-key"] = store_key(cfg, report.get("run_id") or "")
    if stage == "deploy":
        image = report.get("image") or {}
        outputs.update({"image-digest": image.get("digest") or report.get("image_digest") or "",
                        "image-ref": image.get("ref") or ""})
    return outputs


STORE_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def store_key(cfg: Config, run_id: str) -> str:
    """The run's folder name in a model store: the run id, this workflow run, and which config (its path in the
    repository), so two callers on one commit — a scheduled and a pushed run, two configs with the same `name` —
    never share a folder. Empty when the run id is not one."""
    where = hashlib.sha256(workspace_relative(str(Path(cfg.source).resolve())).encode()).hexdigest()[:10]
    key = f"{run_id}-{os.environ.get('GITHUB_RUN_ID') or 'local'}-{where}"
    return key if run_id and STORE_KEY.match(key) else ""


def _model_path(cfg: Config, stage: str, report: dict) -> str:
    """The model a stage handed on (train: the merged or full model, else the adapter; quantize: the quantized
    model), or the one it evaluated; "" when there is none."""
    if stage == "evaluate":
        model = (report.get("model") or {}).get("path")
        return str(cfg.resolve(model)) if model and cfg.resolve(model).exists() else (model or "")
    if stage in ("train", "quantize"):
        try:
            return str(stages.produced(cfg, stage).path)
        except StageError:
            return ""
    return ""
