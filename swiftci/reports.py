"""Versioned JSON reports and text files, written atomically: a crash never leaves a half-written file or a report
that claims success (write to a temporary file in the same folder, fsync, then `os.replace`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

REPORT_VERSION = 2  # 2: every failure is `error: {kind, reason, hint}` (see swiftci/stages.py)


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def new_report(stage: str, status: str, **fields: Any) -> dict:
    return {"version": REPORT_VERSION, "stage": stage, "status": status, **fields}


def loss_chart(records: list[dict], max_points: int = 60) -> str:
    """A mermaid `xychart-beta` line of the training loss (GitHub renders it in comments and job summaries)."""
    points = [r for r in records if isinstance(r.get("loss"), (int, float))]
    if len(points) < 2:
        return ""
    if len(points) > max_points:
        step = (len(points) - 1) / (max_points - 1)
        points = [points[round(i * step)] for i in range(max_points)]
    top = max(r["loss"] for r in points)
    values = ", ".join(f"{r['loss']:.4g}" for r in points)
    return "\n".join([
        "```mermaid",
        "xychart-beta",
        '    title "Training loss"',
        f'    x-axis "step" {points[0]["step"]} --> {points[-1]["step"]}',
        f'    y-axis "loss" 0 --> {top * 1.05:.3g}',
        f"    line [{values}]",
        "```",
    ])


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
