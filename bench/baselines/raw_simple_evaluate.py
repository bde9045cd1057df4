"""Baseline for bench/eval_baseline.py: one plain lm-eval `simple_evaluate` call, written as a user would.

    python bench/baselines/raw_simple_evaluate.py BASE_MODEL ADAPTER|- TASK_DIR BATCH TASK [TASK ...]

`--local-index` builds the TaskManager from TASK_DIR only (lm-eval's fastest setup); by default it also indexes
lm-eval's built-in tasks, as `TaskManager(include_path=...)` does.
"""

import os
import sys

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

args = sys.argv[1:]
local_index = "--local-index" in args
args = [a for a in args if a != "--local-index"]
base, adapter, task_dir, batch, *tasks = args
model_args = {"pretrained": base, "dtype": "float32"}
if adapter != "-":
    model_args["peft"] = adapter
os.chdir(task_dir)  # the task YAMLs name their data files relative to their folder
manager = TaskManager(include_path=task_dir, include_defaults=not local_index)
result = simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=manager,
                         batch_size=int(batch), device="cpu", apply_chat_template=True, log_samples=False)
print({t: {k: v for k, v in r.items() if "," in k} for t, r in result["results"].items()})
