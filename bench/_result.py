"""How a bench script hands its figures to `make bench` (tools/bench_table.py gathers them into one table): one line
`RESULT {json}` per figure, beside the script's own human-readable output."""

from __future__ import annotations

import json


def result(bench: str, measure: str, value: float, goal: str | None = None) -> None:
    """`goal` as `>= 1.0` or `<= 1.5` (or None: reported, no goal)."""
    print("RESULT " + json.dumps({"bench": bench, "measure": measure, "value": value, "goal": goal}), flush=True)
