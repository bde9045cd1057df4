"""Training throughput: swiftci vs the plain transformers Trainer as a competent user would set it up — its
defaults, `group_by_length` (one flag), and padding-free flattening — same model, data and hyperparameters.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--repeats 3]

Everything runs in this one invocation, interleaved round by round, each run in its own process, on the tiny
example model and two generated chat datasets of one epoch's rows (steps × batch): rows that vary in length like
instruction data (40 to 400 characters) and rows of one length (25 five-letter words: 233 tokens each). Every
contender trains on the same rows, each in its own sampler's order. Throughput counts non-padding tokens per second
of training-loop time. Prints, for each data set and tuner, the medians and swiftci's ratio to the best baseline
(goal >= 1.0): the ratio of the medians, and the median of each round's ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from _result import result  # one RESULT line per figure, for `make bench`

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples/tiny/base-model"
BATCH, MAX_LENGTH, LR = 16, 512, 1e-3


SETUPS = ("defaults", "group_by_length", "padding_free")


def make_data(path: Path, n: int, fixed: bool = False) -> None:
    rng = random.Random(7)
    with open(path, "w") as f:
        for _ in range(n):
            count = 25 if fixed else rng.randint(3, 50)
            words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(5 if fixed else rng.randint(2, 8)))
                             for _ in range(count))
            answer = words[::-1][: 80 if fixed else rng.randint(10, 150)]
            f.write(json.dumps({"messages": [{"role": "user", "content": words},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def swiftci_tps(work: Path, data: Path, tuner: str, steps: int) -> float:
    cfg = {"name": "bench", "output_dir": str(work / "out"), "model": {"id": str(MODEL)},
           "data": {"train": str(data), "format": "messages"},
           "train": {"tuner": tuner, "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}, "learning_rate": LR,
                     "batch_size": BATCH, "max_length": MAX_LENGTH, "max_steps": steps, "save_steps": 10**6,
                     "logging_steps": 25, "seed": 42}}
    work.mkdir(parents=True, exist_ok=True)
    (work / "swiftci.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "swiftci.cli", "train", "-c", str(work / "swiftci.yaml")], check=True,
                   capture_output=True)
    report = json.loads((work / "out/train/train_report.json").read_text())
    return report["metrics"]["tokens_per_second"]


def baseline_tps(data: Path, tuner: str, steps: int, setup: str = "defaults") -> float:
    out = subprocess.run([sys.executable, str(ROOT / "bench/baselines/plain_trainer.py"), str(MODEL), str(data),
                          tuner, str(BATCH), str(MAX_LENGTH), str(steps), str(LR), "fp32", setup],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit("build the tiny model first: make tiny-model")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'data':9} {'tuner':5} {'swiftci':>8} " + " ".join(f"{s:>15}" for s in SETUPS) + "  ratio to best")
        for name, fixed in (("variable", False), ("fixed", True)):
            data = tmp / f"{name}.jsonl"
            # one epoch's rows: every contender trains on all of them, each in its own order (with more rows, each
            # sampler's first steps would pick other rows of other lengths, and tokens/s would compare two loads)
            make_data(data, n=args.steps * BATCH, fixed=fixed)
            for tuner in ("lora", "full"):
                runs: dict[str, list[float]] = {"swiftci": [], **{s: [] for s in SETUPS}}
                for i in range(args.repeats):  # interleaved: load on the machine hits every contender alike
                    runs["swiftci"].append(swiftci_tps(tmp / f"{name}-{tuner}{i}", data, tuner, args.steps))
                    for setup in SETUPS:
                        runs[setup].append(baseline_tps(data, tuner, args.steps, setup))
                med = {k: statistics.median(v) for k, v in runs.items()}
                best = max(SETUPS, key=lambda s: med[s])
                # each round's ratio: the runs of one round share the machine's load, so these drift less than
                # the medians (single runs of one contender spread by 15 % or more on a shared 2-core machine)
                paired = statistics.median(a / b for a, b in zip(runs["swiftci"], runs[best]))
                print(f"{name:9} {tuner:5} {med['swiftci']:8.0f} " + " ".join(f"{med[s]:15.0f}" for s in SETUPS)
                      + f"  {med['swiftci'] / med[best]:.2f}, paired {paired:.2f} (best: {best}; goal >= 1.0)")
                result("train_throughput", f"{tuner} on {name}-length rows: tokens/s, swiftci / best Trainer "
                       f"({best}, {med[best]:,.0f}), median of the rounds' ratios", paired, ">= 1.0")


if __name__ == "__main__":
    main()
