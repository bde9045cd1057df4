"""Training throughput: swiftci vs a plain transformers Trainer script, same model, data and hyperparameters.

    .venv/bin/python bench/train_throughput.py [--steps 60] [--repeats 3]

Both run in this one invocation, alternating, each in its own process, on the tiny example model and a generated
chat dataset whose rows vary in length like real instruction data (40 to 400 characters). Throughput counts
non-padding tokens per second of training-loop time. Prints, for lora and full, the median of swiftci tok/s
divided by the baseline's (goal >= 1.0).
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

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples/tiny/base-model"
BATCH, MAX_LENGTH, LR = 16, 512, 1e-3


def make_data(path: Path, n: int = 3000) -> None:
    rng = random.Random(7)
    with open(path, "w") as f:
        for _ in range(n):
            words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
                             for _ in range(rng.randint(3, 50)))
            answer = words[::-1][: rng.randint(10, 150)]
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


def baseline_tps(data: Path, tuner: str, steps: int) -> float:
    out = subprocess.run([sys.executable, str(ROOT / "bench/baselines/plain_trainer.py"), str(MODEL), str(data),
                          tuner, str(BATCH), str(MAX_LENGTH), str(steps), str(LR)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit("build the tiny model first: make tiny-model")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data.jsonl"
        make_data(data)
        print(f"{'tuner':6} {'swiftci tok/s':>14} {'Trainer tok/s':>14} {'ratio':>6}")
        for tuner in ("lora", "full"):
            ratios, ours_all, base_all = [], [], []
            for i in range(args.repeats):
                ours = swiftci_tps(tmp / f"{tuner}{i}", data, tuner, args.steps)
                base = baseline_tps(data, tuner, args.steps)
                ratios.append(ours / base)
                ours_all.append(ours)
                base_all.append(base)
            print(f"{tuner:6} {statistics.median(ours_all):14.0f} {statistics.median(base_all):14.0f} "
                  f"{statistics.median(ratios):6.2f}   (median of {args.repeats}; goal >= 1.0)")


if __name__ == "__main__":
    main()
