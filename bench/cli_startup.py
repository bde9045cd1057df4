"""CLI start-up: median wall time of `swiftci --help` divided by that of `python -c "import click"`.

    .venv/bin/python bench/cli_startup.py [--runs 21]

Both run in this one invocation, alternating, as fresh processes of this interpreter (the floor is Python's own
start-up plus click, which the CLI needs anyway). Goal <= 1.5; ms-swift's CLI measures about 40, axolotl's about 66.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _result import result  # one RESULT line per figure, for `make bench`


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    entry = shutil.which("swiftci", path=str(Path(sys.executable).parent))
    if entry is None:
        sys.exit("swiftci is not installed next to this interpreter; run `make setup` first")
    ours_cmd = [entry, "--help"]
    base_cmd = [sys.executable, "-c", "import click"]
    wall(ours_cmd), wall(base_cmd)  # warm the file cache
    ours, base = [], []
    for _ in range(args.runs):
        ours.append(wall(ours_cmd))
        base.append(wall(base_cmd))
    o, b = statistics.median(ours), statistics.median(base)
    print(f"swiftci --help        {o * 1000:7.1f} ms (median of {args.runs})")
    print(f"python -c 'import click' {b * 1000:4.1f} ms")
    print(f"ratio {o / b:.2f}   (goal <= 1.5)")
    result("cli_startup", "swiftci --help / python -c 'import click' (wall time)", o / b, "<= 1.5")


if __name__ == "__main__":
    main()
