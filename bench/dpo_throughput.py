"""DPO throughput: swiftci's `train.method: dpo` vs a plain trl DPOTrainer script, same model, pairs and settings.

    .venv/bin/python bench/dpo_throughput.py [--steps 60] [--repeats 3]

Both run in this one invocation, alternating, each in its own process, on the tiny example model (LoRA) and
generated reversal pairs in trl's conversational shape. Throughput counts non-padding tokens per second of
training-loop time. Prints the median of swiftci tok/s divided by the baseline's (goal >= 1.0).
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
BATCH, MAX_LENGTH, LR = 16, 128, 1e-3


def make_pairs(path: Path, n: int = 2000) -> None:
    rng = random.Random(7)
    with open(path, "w") as f:
        while n:
            words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(4))
                             for _ in range(rng.randint(1, 6)))
            good, bad = words[::-1], words
            if good == bad:
                continue
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"reverse: {words}"}],
                                "chosen": [{"role": "assistant", "content": good}],
                                "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
            n -= 1


def swiftci_tps(work: Path, data: Path, steps: int) -> float:
    cfg = {"name": "bench", "output_dir": str(work / "out"), "model": {"id": str(MODEL)},
           "data": {"train": str(data), "format": "preference"},
           "train": {"method": "dpo", "tuner": "lora", "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
                     "learning_rate": LR, "batch_size": BATCH, "max_length": MAX_LENGTH, "max_steps": steps,
                     "save_steps": 10**6, "logging_steps": 25, "seed": 42}}
    work.mkdir(parents=True, exist_ok=True)
    (work / "swiftci.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "swiftci.cli", "train", "-c", str(work / "swiftci.yaml")], check=True,
                   capture_output=True)
    return json.loads((work / "out/train/train_report.json").read_text())["metrics"]["tokens_per_second"]


def baseline_tps(data: Path, steps: int) -> float:
    out = subprocess.run([sys.executable, str(ROOT / "bench/baselines/plain_dpo.py"), str(MODEL), str(data),
                          str(BATCH), str(MAX_LENGTH), str(steps), str(LR)], check=True, capture_output=True,
                         text=True)
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
        data = tmp / "pairs.jsonl"
        make_pairs(data)
        ours, base = [], []
        for i in range(args.repeats):
            ours.append(swiftci_tps(tmp / f"run{i}", data, args.steps))
            base.append(baseline_tps(data, args.steps))
        ratio = statistics.median(o / b for o, b in zip(ours, base))
        print(f"dpo (lora): swiftci {statistics.median(ours):,.0f} tok/s, trl DPOTrainer "
              f"{statistics.median(base):,.0f} tok/s, ratio {ratio:.2f} (median of {args.repeats}; goal >= 1.0)")
        result("dpo_throughput", "dpo lora tokens/s, swiftci / trl DPOTrainer", ratio, ">= 1.0")


if __name__ == "__main__":
    main()
