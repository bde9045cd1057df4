"""`swiftci diff A B`: two runs side by side — config keys, data and model hashes, environment, metrics.

A and B are run.json files or output folders (`<out>/train/run.json`, with `<out>/train/train_report.json` and
`<out>/evaluate/eval_report.json` for the metrics). Config and environment show the keys that differ (there are
many); data, model files and metrics show every row. Nothing is loaded or run; only the records are read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from swiftci import provenance, reports, stages
from swiftci.errors import SwiftCIError

VERSION = 1
SECTIONS = ("config", "data", "model", "environment", "metrics")
CHANGED_ONLY = ("config", "environment")  # every row of the others is shown


@dataclass
class Row:
    section: str
    key: str
    a: Any
    b: Any

    @property
    def changed(self) -> bool:
        return self.a != self.b


@dataclass
class Side:
    label: str
    record: dict
    train_report: dict
    eval_report: dict


def load(path: Path, label: str | None = None) -> Side:
    """A run's record and, when they lie where an output folder keeps them, its train and eval reports."""
    record_path = provenance.find_record(Path(path))
    record = provenance.read_record(record_path)
    stage_dir = record_path.parent
    if not (stage_dir / stages.TRAIN.report).is_file() and (stage_dir.parent / stages.TRAIN.report).is_file():
        stage_dir = stage_dir.parent  # a chained training's step: the stage report is one folder up
    out_dir = stage_dir.parent
    return Side(label or str(path), record, _read(stage_dir / stages.TRAIN.report),
                _read(out_dir / "evaluate" / stages.EVALUATE.report))


def _read(path: Path) -> dict:
    try:
        data = reports.read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sections(side: Side) -> dict[str, dict[str, Any]]:
    r = side.record
    recorded = r.get("config") or {}
    values = recorded.get("values")
    config = provenance.flatten(values) if isinstance(values, dict) else {"sha256": recorded.get("sha256")}
    data = {v["file"]: v.get("sha256") for v in (r.get("data") or {}).values() if isinstance(v, dict) and v.get("file")}
    base = r.get("base_model") or {}
    model = {k: base.get(k) for k in ("id", "source", "revision_resolved") if k in base}
    model.update({f"files/{name}": sha for name, sha in (base.get("files") or {}).items()})
    metrics: dict[str, Any] = {}
    train = side.train_report.get("metrics") or {}
    for key in ("train_loss_last", "validation_loss", "steps", "tokens_per_second", "peak_memory_mb"):
        if key in train:
            metrics[f"train/{key}"] = train[key]
    for task, by_metric in (side.eval_report.get("metrics") or {}).items():
        for metric, m in (by_metric or {}).items():
            if isinstance(m, dict) and "value" in m:
                metrics[f"{task}/{metric}"] = m["value"]
    return {"config": config, "data": data, "model": model,
            "environment": provenance.flatten(r.get("environment") or {}), "metrics": metrics}


def compare(a: Side, b: Side) -> list[Row]:
    sa, sb = _sections(a), _sections(b)
    rows = []
    for section in SECTIONS:
        for key in dict.fromkeys([*sa[section], *sb[section]]):
            rows.append(Row(section, key, sa[section].get(key), sb[section].get(key)))
    return rows


def _cell(value: Any, section: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if section in ("data", "model") and len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:12] + "…"  # a sha256: enough to tell two apart
    return text


def _shown(rows: list[Row], section: str) -> tuple[list[Row], int]:
    mine = [r for r in rows if r.section == section]
    if section in CHANGED_ONLY:
        changed = [r for r in mine if r.changed]
        return changed, len(mine) - len(changed)
    return mine, 0


def markdown(a: Side, b: Side, rows: list[Row], *, title: str | None = None) -> str:
    changed = sum(r.changed for r in rows)
    lines = [f"#### {title or 'swiftci diff'}", "",
             f"A: `{a.label}` · B: `{b.label}` · {changed} difference(s)" if changed else
             f"A: `{a.label}` · B: `{b.label}` · no differences"]
    for section in SECTIONS:
        shown, hidden = _shown(rows, section)
        if not shown and not hidden:
            continue
        lines += ["", f"**{section}**" + (f" ({hidden} unchanged not shown)" if hidden else ""), ""]
        if not shown:
            lines.append("no differences")
            continue
        lines += ["| key | A | B | |", "|---|---|---|:-:|"]
        lines += [f"| {r.key} | {_cell(r.a, section)} | {_cell(r.b, section)} | {'≠' if r.changed else ''} |"
                  for r in shown]
    return "\n".join(lines) + "\n"


def text(a: Side, b: Side, rows: list[Row]) -> str:
    changed = sum(r.changed for r in rows)
    lines = [f"A: {a.label}", f"B: {b.label}", f"{changed} difference(s)"]
    for section in SECTIONS:
        shown, hidden = _shown(rows, section)
        if not shown and not hidden:
            continue
        lines += ["", f"{section}:" + (f" ({hidden} unchanged not shown)" if hidden else "")]
        width = max((len(r.key) for r in shown), default=0)
        for r in shown:
            mark = "!=" if r.changed else "=="
            lines.append(f"  {r.key:<{width}}  {_cell(r.a, section)}  {mark}  {_cell(r.b, section)}")
    return "\n".join(lines) + "\n"


def as_json(a: Side, b: Side, rows: list[Row]) -> dict:
    return {"version": VERSION, "a": a.label, "b": b.label, "differences": sum(r.changed for r in rows),
            "rows": [{**asdict(r), "changed": r.changed} for r in rows]}


def since_last_green(this_out: Path, green: Path) -> str | None:
    """The sticky comment's "what changed since the last green run on the default branch": the differing rows, or
    None when either run has no record."""
    try:
        a, b = load(green, "last green run"), load(this_out, "this run")
    except (SwiftCIError, OSError, ValueError):  # no record on one side: the comment has no such section
        return None
    rows = [r for r in compare(a, b) if r.changed]
    return markdown(a, b, rows, title="What changed since the last green run on the default branch")
