"""The regression guard: this run's training speed, memory, loss and eval metrics against an earlier run's reports —
the last green run on the default branch — with a ⚠️ on every change beyond `guard:` and, with `guard.fail`, exit 1.

The earlier run is any folder laid out like an output folder (`<folder>/train/train_report.json`,
`<folder>/evaluate/eval_report.json`): a model-store folder of that run, or its report artifacts unpacked. Only its
reports are read, as figures to compare; nothing from it is loaded or run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from swiftci import reports, stages
from swiftci.config import Config, GuardConfig
from swiftci.errors import UsageError

VERSION = 1


@dataclass
class Delta:
    """One figure of both runs; `limit` is the allowed change as the config says it (e.g. `-10%`)."""

    name: str
    before: float | None
    after: float | None
    limit: str
    flagged: bool

    @property
    def change_pct(self) -> float | None:
        if self.before is None or self.after is None or self.before == 0:
            return None
        return (self.after - self.before) / abs(self.before) * 100


def _beyond(before: float | None, after: float | None, limit: str) -> bool:
    """`-10%`: a fall of more than 10 % is flagged; `+10%`: a rise of more than 10 %."""
    if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)) or before == 0:
        return False
    allowed = float(limit.rstrip("%"))
    change = (after - before) / abs(before) * 100
    return change < allowed if allowed < 0 else change > allowed


def _report(folder: Path, stage: str) -> dict:
    """A stage's report, or {} when that run did not run the stage (its figures then show as —)."""
    path = folder / stage / stages.get(stage).report
    report = reports.read_json(path) if path.is_file() else None
    return report if isinstance(report, dict) else {}


def _figures(folder: Path) -> dict[str, tuple[float | None, str]]:
    """name -> (value, which guard key applies) for one run's reports."""
    train = _report(folder, "train").get("metrics") or {}
    figures: dict[str, tuple[float | None, str]] = {
        "train tokens/s": (train.get("tokens_per_second"), "tokens_per_second"),
        "train peak memory (MB)": (train.get("peak_memory_mb"), "peak_memory"),
        "train final loss": (train.get("train_loss_last"), "final_loss"),
    }
    for task, metrics in (_report(folder, "evaluate").get("metrics") or {}).items():
        for metric, m in metrics.items():
            if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
                key = "eval_metric" if m.get("higher_is_better", True) else "eval_metric_lower_is_better"
                figures[f"{task}/{metric}"] = (float(m["value"]), key)
    return figures


def _limit(guard: GuardConfig, key: str) -> str:
    if key == "eval_metric_lower_is_better":  # a rise is the regression: the same size, the other way
        return "+" + guard.eval_metric.lstrip("-")
    return getattr(guard, key)


def compare(cfg: Config, against: Path) -> list[Delta]:
    """This run (cfg's output folder) against the reports in `against`: every figure either run has."""
    if not (against / "train").is_dir() and not (against / "evaluate").is_dir():
        raise UsageError(f"guard: {against} holds no train/ or evaluate/ reports; pass the folder of the last green "
                         "run (laid out like an output folder: train/train_report.json, evaluate/eval_report.json)")
    guard = cfg.guard or GuardConfig()
    before, after = _figures(against), _figures(cfg.output_path)
    deltas = []
    for name in dict.fromkeys([*after, *before]):
        b, key = before.get(name, (None, after.get(name, (None, ""))[1]))
        a = after.get(name, (None, key))[0]
        if a is None and b is None:
            continue
        limit = _limit(guard, key)
        deltas.append(Delta(name, b, a, limit, _beyond(b, a, limit)))
    return deltas


def failed(cfg: Config, deltas: list[Delta]) -> bool:
    return bool((cfg.guard or GuardConfig()).fail and any(d.flagged for d in deltas))


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def markdown(deltas: list[Delta], *, title: str = "Since the last green run on the default branch") -> str:
    lines = [f"#### {title}", "", "| figure | last green | this run | change | allowed |", "|---|---:|---:|---:|---:|"]
    for d in deltas:
        change = "—" if d.change_pct is None else f"{d.change_pct:+.1f}%"
        lines.append(f"| {d.name} | {_num(d.before)} | {_num(d.after)} | {change}{' ⚠️' if d.flagged else ''} "
                     f"| {d.limit} |")
    flagged = [d.name for d in deltas if d.flagged]
    lines += ["", f"⚠️ beyond the guard: {', '.join(flagged)}" if flagged else "Within the guard."]
    return "\n".join(lines) + "\n"


def as_json(cfg: Config, deltas: list[Delta]) -> dict:
    return {"version": VERSION, "failed": failed(cfg, deltas),
            "deltas": [{**vars(d), "change_pct": d.change_pct} for d in deltas]}
