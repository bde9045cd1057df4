"""`make bench`: run every bench/ script, one after another, and print one table of their figures.

    .venv/bin/python tools/bench_table.py [--only NAME ...] [--out FILE.md]

Each script prints its own output (shown as it runs) and one `RESULT {json}` line per figure (bench/_result.py).
The table says, for each figure, its goal and whether it was met; a script that fails is a row saying so, and the
exit code is 1 when any script failed (a missed goal is a finding, not a failure).
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def run(script: Path) -> tuple[int, list[dict]]:
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    results = []
    for line in proc.stdout:
        if line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
        else:
            print(f"  {line}", end="", flush=True)
    return proc.wait(), results


def met(value: float, goal: str | None) -> str:
    if not goal:
        return ""
    op, _, bound = goal.partition(" ")
    return "yes" if COMPARE[op](value, float(bound)) else "NO"


def table(rows: list[dict]) -> str:
    lines = ["| bench | measure | value | goal | met |", "|---|---|---:|---|---|"]
    for r in rows:
        value = r["value"] if isinstance(r["value"], str) else f"{r['value']:.3g}"
        lines.append(f"| {r['bench']} | {r['measure']} | {value} | {r.get('goal') or ''} | "
                     f"{r.get('met', met(r['value'], r.get('goal')) if not isinstance(r['value'], str) else '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="bench script names without .py, e.g. train_throughput")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args()
    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    rows, failed = [], False
    for script in scripts:
        print(f"== bench/{script.name}", flush=True)
        code, results = run(script)
        if code != 0:
            failed = True
            rows.append({"bench": script.stem, "measure": "(the script failed)", "value": f"exit {code}",
                         "goal": None, "met": "NO"})
        rows += results
    text = table(rows)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
