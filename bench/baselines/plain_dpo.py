"""Baseline for bench/dpo_throughput.py: the plain trl DPOTrainer (+ peft LoRA) script a user would write by hand,
on the same model, pairs and settings as swiftci. Prints one JSON line with its throughput.

    python bench/baselines/plain_dpo.py MODEL_DIR PAIRS.jsonl BATCH MAX_LENGTH MAX_STEPS LR
"""

import json
import sys
import time
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOConfig, DPOTrainer

model_dir, data_path, batch, max_length, max_steps, lr = sys.argv[1:7]
set_seed(42)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
rows = Dataset.from_list([json.loads(line) for line in open(data_path)])
with tempfile.TemporaryDirectory() as out:
    args = DPOConfig(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(max_steps),
                     learning_rate=float(lr), lr_scheduler_type="cosine", seed=42, logging_steps=25,
                     save_strategy="no", report_to="none", disable_tqdm=True, bf16=False,
                     gradient_checkpointing=False, max_length=int(max_length),
                     include_num_input_tokens_seen="non_padding", dataloader_pin_memory=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
    t0 = time.monotonic()  # the wall time of train(), the span swiftci's tokens_per_second covers too
    trainer.train()
    seconds = time.monotonic() - t0
    print(json.dumps({"tokens": trainer.state.num_input_tokens_seen, "seconds": seconds,
                      "tokens_per_second": trainer.state.num_input_tokens_seen / seconds}))
