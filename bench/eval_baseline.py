"""Evaluation cost: swiftci evaluate vs plain lm-eval, on the tiny example, measured in this one run.

    .venv/bin/python bench/eval_baseline.py [--repeats 3]

Prints two ratios (median over repeats; every measurement is a fresh process, alternating):
1. `swiftci evaluate` with `baseline: base` / two separate `lm-eval run` CLI calls (base model, then the
   candidate base+adapter) — goal <= 0.67. swiftci loads the weights once, scores the baseline with the adapter
   disabled, and indexes only the local task folder.
2. `swiftci evaluate` with `baseline: none` / one raw `simple_evaluate` on the same model and tasks — goal <= 1.05.
   Also printed against a raw call that indexes only the local task folder (lm-eval's fastest setup), to show
   what swiftci itself adds.
Needs a trained tiny example (`make demo`, or it trains one first).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _result import result  # one RESULT line per figure, for `make bench`

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples/tiny"
CONFIG = TINY / "swiftci.yaml"
BASE = TINY / "base-model"
ADAPTER = TINY / "out/train/adapter"
TASKS = ["tiny_reverse", "tiny_reverse_mc"]
BATCH = "32"
BIN = Path(sys.executable).parent


def timed(cmd: list[str], cwd: Path = ROOT) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def lm_eval_cli(model_args: str) -> list[str]:
    return [str(BIN / "lm-eval"), "run", "--model", "hf", "--model_args", model_args, "--tasks", *TASKS,
            "--include_path", str(TINY / "tasks"), "--apply_chat_template", "--batch_size", BATCH, "--device", "cpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (ADAPTER / "adapter_config.json").is_file():
        print("training the tiny example first ...", flush=True)
        subprocess.run([str(BIN / "swiftci"), "train", "-c", str(CONFIG)], check=True, capture_output=True)
    swiftci = [str(BIN / "swiftci"), "evaluate", "-c", str(CONFIG), "--set", "evaluate.gates=[]"]
    raw = [sys.executable, str(ROOT / "bench/baselines/raw_simple_evaluate.py"), str(BASE), str(ADAPTER),
           str(TINY / "tasks"), BATCH, *TASKS]
    rows: dict[str, list[float]] = {k: [] for k in ("ours_base", "two_cli", "ours_none", "raw", "raw_local")}
    for _ in range(args.repeats):
        rows["ours_base"].append(timed([*swiftci, "--baseline", "base"]))
        rows["two_cli"].append(timed(lm_eval_cli(f"pretrained={BASE},dtype=float32"), cwd=TINY / "tasks")
                               + timed(lm_eval_cli(f"pretrained={BASE},peft={ADAPTER},dtype=float32"),
                                       cwd=TINY / "tasks"))
        rows["ours_none"].append(timed([*swiftci, "--baseline", "none"]))
        rows["raw"].append(timed(raw))
        rows["raw_local"].append(timed([*raw, "--local-index"]))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"swiftci evaluate, baseline: base      {med['ours_base']:6.1f} s")
    print(f"two lm-eval CLI runs (base, candidate) {med['two_cli']:6.1f} s")
    print(f"ratio {med['ours_base'] / med['two_cli']:.2f}   (goal <= 0.67)")
    result("eval_baseline", "evaluate with baseline: base / two lm-eval CLI runs (wall time)",
           med["ours_base"] / med["two_cli"], "<= 0.67")
    print(f"swiftci evaluate, baseline: none      {med['ours_none']:6.1f} s")
    print(f"raw simple_evaluate                    {med['raw']:6.1f} s")
    print(f"ratio {med['ours_none'] / med['raw']:.2f}   (goal <= 1.05)")
    result("eval_baseline", "evaluate with baseline: none / raw simple_evaluate (wall time)",
           med["ours_none"] / med["raw"], "<= 1.05")
    print(f"raw simple_evaluate, local task index  {med['raw_local']:6.1f} s   "
          f"(ratio {med['ours_none'] / med['raw_local']:.2f}: what swiftci adds over lm-eval's fastest setup)")
    print(f"(median of {args.repeats} runs each)")


if __name__ == "__main__":
    main()
