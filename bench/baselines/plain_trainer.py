"""Baseline for bench/train_throughput.py: the plain transformers Trainer (+ peft for LoRA) script a user would
write by hand, on the same model, data and hyperparameters as swiftci. Prints one JSON line with its throughput.

    python bench/baselines/plain_trainer.py MODEL_DIR DATA.jsonl TUNER BATCH MAX_LENGTH MAX_STEPS LR [PRECISION] [SETUP]

PRECISION is fp32 (default) or bf16: mixed precision as a user sets it up, the frozen base of a LoRA in bf16 and
full fine-tuning on fp32 master weights (what swiftci does too). MAX_STEPS 0 trains one epoch. SETUP is how a
competent user tunes the Trainer: `defaults`, `group_by_length` (transformers' own length-grouped sampler, one
flag) or `padding_free` (DataCollatorWithFlattening: no padding, sequence boundaries in position_ids).
"""

import json
import sys
import tempfile
import time

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening,
                          Trainer, TrainingArguments, set_seed)

model_dir, data_path, tuner, batch, max_length, max_steps, lr = sys.argv[1:8]
bf16 = (sys.argv[8] if len(sys.argv) > 8 else "fp32") == "bf16"
setup = sys.argv[9] if len(sys.argv) > 9 else "defaults"
set_seed(42)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 and tuner == "lora" else torch.float32)
if tuner == "lora":
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

rows = [json.loads(x)["messages"] for x in open(data_path)]
examples = []
for msgs in rows:
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False, truncation=True, max_length=int(max_length))["input_ids"]
    labels = [-100] * min(len(p_ids), len(ids)) + ids[len(p_ids):]
    examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})

with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(max_steps) or -1,
                             num_train_epochs=1, bf16=bf16,
                             **({"train_sampling_strategy": "group_by_length"} if setup == "group_by_length" else {}),
                             learning_rate=float(lr), lr_scheduler_type="cosine", warmup_steps=0.03, seed=42,
                             logging_steps=25, save_strategy="no", report_to="none", disable_tqdm=True,
                             include_num_input_tokens_seen="non_padding", dataloader_pin_memory=False)
    collator = DataCollatorWithFlattening() if setup == "padding_free" else DataCollatorForSeq2Seq(tok, padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    # the wall time of trainer.train(), the span swiftci's tokens_per_second covers too (the Trainer's own
    # train_runtime starts after the data loader, optimizer and model wrapping are set up)
    t0 = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"tokens": trainer.state.num_input_tokens_seen, "seconds": seconds, "steps": trainer.state.global_step,
                      "tokens_per_second": trainer.state.num_input_tokens_seen / seconds, "peak_memory_mb": peak}))
