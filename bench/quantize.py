"""Quantization on the tiny example: size ratio after/before, perplexity ratio after/before, and wall time, for
GPTQ and AWQ 4-bit, measured in this one run through `swiftci quantize` (eval-gate re-run switched off so the
time is the quantization's own: merge check, calibration, quantize, save, perplexity before and after).

    .venv/bin/python bench/quantize.py

Needs a trained tiny example (`make demo`, or it trains one first).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _result import result  # one RESULT line per figure, for `make bench`

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples/tiny/swiftci.yaml"
BIN = Path(sys.executable).parent


def main() -> None:
    if not (ROOT / "examples/tiny/out/train/model/config.json").is_file():
        print("training the tiny example first ...", flush=True)
        subprocess.run([str(BIN / "swiftci"), "train", "-c", str(CONFIG)], check=True, capture_output=True)
    print(f"{'method':6} {'size after/before':>18} {'perplexity after/before':>24} {'wall s':>7} {'quantize s':>10}")
    for method in ("gptq", "awq"):
        t0 = time.perf_counter()
        proc = subprocess.run([str(BIN / "swiftci"), "quantize", "-c", str(CONFIG), "--set",
                               f"quantize.method={method}", "--set", "quantize.gates.reuse_eval_gates=false"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        m = json.loads((ROOT / "examples/tiny/out/quantize/quantize_report.json").read_text())["metrics"]
        print(f"{method:6} {m['size_ratio']:18.3f} {m['perplexity_after'] / m['perplexity_before']:24.4f} "
              f"{wall:7.1f} {m['quantize_seconds']:10.1f}")
        result("quantize", f"{method} size after / before", m["size_ratio"], None)
        result("quantize", f"{method} held-out perplexity after / before",
               m["perplexity_after"] / m["perplexity_before"], None)


if __name__ == "__main__":
    main()
