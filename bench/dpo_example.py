"""What the SFT -> DPO tiny example gains, and what the gain is owed to.

    .venv/bin/python bench/dpo_example.py

Runs `swiftci run -c examples/tiny/swiftci-dpo.yaml` (60 SFT steps, then the DPO step), evaluates the SFT step's
model with the same lm-eval task, and trains the control a careful reader asks for: the same LoRA on the same SFT
model for as many steps, with the SFT loss alone on the chosen answers. Prints held-out exact match for the three
models and held-out preference accuracy of the DPO step. The issue's bar: DPO's exact match above SFT's, preference
accuracy above 0.9.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from _result import result  # one RESULT line per figure, for `make bench`

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples/tiny"
SWIFTCI = [sys.executable, "-m", "swiftci"]


def exact_match(out: Path) -> float:
    report = json.loads((out / "evaluate/eval_report.json").read_text())
    return report["metrics"]["tiny_reverse"]["exact_match"]["value"]


def swiftci(*args: str) -> None:
    proc = subprocess.run([*SWIFTCI, *args], cwd=TINY, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"swiftci {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def control_config(tmp: Path, dpo: dict, sft_model: Path) -> Path:
    """The DPO step's settings with `method: sft` on the chosen answers of the same pairs."""
    then = dpo["train"]["then"]
    rows = [json.loads(line) for line in (TINY / then["data"]["train"]).read_text().splitlines()]
    data = tmp / "chosen.jsonl"
    data.write_text("".join(json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n" for r in rows))
    sft = {k: v for k, v in dpo["train"].items() if k != "then"}
    train = {**sft, **{k: v for k, v in then.items() if k not in ("method", "data", "dpo")}}
    cfg = {**dpo, "name": "dpo-control", "output_dir": str(tmp / "control"), "model": {"id": str(sft_model)},
           "data": {**dpo["data"], "train": str(data)}, "train": train}
    cfg["data"]["validation"] = str(TINY / dpo["data"]["validation"])
    cfg["evaluate"]["task_dir"] = str(TINY / dpo["evaluate"]["task_dir"])
    path = tmp / "control.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    dpo = yaml.safe_load((TINY / "swiftci-dpo.yaml").read_text())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out = tmp / "dpo"
        swiftci("run", "-c", "swiftci-dpo.yaml", "--set", f"output_dir={out}")
        report = json.loads((out / "train/train_report.json").read_text())
        accuracy = report["metrics"]["validation_preference"]["rewards_accuracies"]
        sft_model = out / "train/sft/model"
        swiftci("evaluate", "-c", "swiftci-dpo.yaml", "--set", f"output_dir={tmp / 'sft'}", "--model", str(sft_model))
        swiftci("run", "-c", str(control_config(tmp, dpo, sft_model)))
        then = dpo["train"]["then"]
        rows = [(f"sft step ({dpo['train']['max_steps']} steps)", exact_match(tmp / "sft")),
                (f"dpo step ({then['max_steps']} steps, loss {then['dpo']['loss_type']})",
                 exact_match(out)),
                ("control: sft on the chosen answers, same steps", exact_match(tmp / "control"))]
    print("| model | held-out exact match |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    print(f"\nheld-out preference accuracy of the dpo step: {accuracy:.3f} (bar: > 0.9)")
    print(f"dpo / sft exact match: {rows[1][1] / max(rows[0][1], 1e-9):.2f} (bar: > 1.0)")
    result("dpo_example", "held-out preference accuracy of the dpo step", accuracy, "> 0.9")
    result("dpo_example", "dpo / sft held-out exact match", rows[1][1] / max(rows[0][1], 1e-9), "> 1.0")


if __name__ == "__main__":
    main()
