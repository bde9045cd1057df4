"""What the vision-language example learns: held-out VQA exact match of the tiny Llava before and after fine-tuning.

    .venv/bin/python bench/vqa_example.py

Builds the example if needed (`make tiny-vqa`), then runs `swiftci train` and `swiftci evaluate` on
examples/tiny-vqa/swiftci.yaml: lm-eval's hf-multimodal scores the base model and the fine-tuned one on 100 held-out
images ("What colour is the square?" — chance 1/4; "How many circles?" — chance 1/3). The issue's bar: >= 0.9.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _result import result  # one RESULT line per figure, for `make bench`

ROOT = Path(__file__).resolve().parents[1]
VQA = ROOT / "examples/tiny-vqa"


def main() -> None:
    if not (VQA / "base-model/config.json").is_file():
        subprocess.run([sys.executable, str(VQA / "build_base_model.py")], check=True, capture_output=True)
    if not (VQA / "data/train.jsonl").is_file():
        subprocess.run([sys.executable, str(VQA / "make_data.py")], check=True, capture_output=True)
    config = str(VQA / "swiftci.yaml")
    subprocess.run([sys.executable, "-m", "swiftci", "train", "-c", config], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "swiftci", "evaluate", "-c", config], capture_output=True)  # exit 1: a finding
    m = json.loads((VQA / "out/evaluate/eval_report.json").read_text())["metrics"]["tiny_vqa"]["exact_match"]
    print(f"held-out exact match: base model {m['baseline']:.2f}, fine-tuned {m['value']:.2f} (bar: >= 0.9)")
    result("vqa_example", "held-out VQA exact match, base model", m["baseline"], None)
    result("vqa_example", "held-out VQA exact match, fine-tuned", m["value"], ">= 0.9")


if __name__ == "__main__":
    main()
