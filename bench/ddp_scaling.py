"""DDP scaling: training tokens/s of `swiftci train` on N processes (train.distributed.strategy: ddp) divided by one
process, the same per-process batch (so N processes train N× the rows per step).

    .venv/bin/python bench/ddp_scaling.py [--procs 2] [--steps 30] [--repeats 1]

On this CPU machine the processes are gloo CPU processes, one OpenMP thread each (torchrun's default); the
one-process run gets the same one thread per process, so the ratio measures what a second process adds. On a
multi-GPU runner `--procs N` compares N GPUs with one. Throughput is the train report's tokens_per_second (non-padding
tokens over the `trainer.train()` time, which for the DDP run includes setting up the process group). Prints
`ddp_scaling: N procs / 1 proc = R` (the median of the repeats; ideal N).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _result import result  # one RESULT line per figure, for `make bench`

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples/tiny"


def config(work: Path, procs: int, steps: int) -> Path:
    cfg = yaml.safe_load((TINY / "swiftci.yaml").read_text())
    cfg["model"]["id"] = str(TINY / "base-model")
    cfg["data"] = {"train": str(TINY / "data/train.jsonl"), "format": "messages"}
    cfg["output_dir"] = str(work / "out")
    for stage in ("evaluate", "quantize", "deploy"):
        cfg.pop(stage, None)
    cfg["train"].update({"max_steps": steps, "batch_size": 16, "logging_steps": steps, "save_steps": 10 * steps,
                         "merge": False})
    if procs > 1:
        cfg["train"]["distributed"] = {"strategy": "ddp", "nproc_per_node": procs}
    path = work / "swiftci.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tokens_per_second(procs: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "swiftci", "train", "-c", str(config(work, procs, steps))],
                       check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.loads((work / "out/train/train_report.json").read_text())
        return report["metrics"]["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    ratios = []
    for _ in range(args.repeats):
        one, many = tokens_per_second(1, args.steps), tokens_per_second(args.procs, args.steps)
        print(f"1 proc: {one:,.0f} tok/s   {args.procs} procs: {many:,.0f} tok/s", flush=True)
        ratios.append(many / one)
    print(f"ddp_scaling: {args.procs} procs / 1 proc = {statistics.median(ratios):.2f}")
    result("ddp_scaling", f"training tokens/s, {args.procs}-process DDP (gloo) / 1 process", statistics.median(ratios),
           None)


if __name__ == "__main__":
    main()
