"""Logits only where a label is (`train.logits: auto`) against logits at every position (transformers' Trainer), on
a model of a real model's shape: Qwen2.5-0.5B's (24 layers, hidden 896, a 151,936-token vocabulary, tied
embeddings), random weights built from that config (nothing is downloaded), fp32 on this machine's CPU.

    .venv/bin/python bench/labelled_logits.py [--tuners lora full] [--steps 3] [--rows 4] [--length 256] [--answer 0.3]

The tiny example model's vocabulary has 103 tokens, so its lm_head is about 3 % of its work and
bench/train_throughput.py cannot show what skipping it is worth; here the lm_head does over a quarter of the
forward's multiply-adds (136M of 494M per token).

Time: the same batches through the same model and optimizer in one process, the two ways interleaved step by step
(forward, backward, clipping, AdamW): swiftci's collator (data.LabelledLogits over data.PadCollator) against the
plain padded batch. Memory: one step each way in its own process, its peak resident set (with full fine-tuning
the peak is AdamW's step, after the logits are freed, so less is saved there). Each row is a prompt then
an answer that is `--answer` of its tokens (0.3: the share of labelled positions in bench/train_throughput.py's
instruction-like rows). Prints, per tuner, the ratio of median step times and of peak memory (all / labelled).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _result import result  # one RESULT line per figure, for `make bench`

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swiftci import data  # noqa: E402

SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)


def build(tuner: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE))
    if tuner == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer


def rows(n: int, length: int, answer: float, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    prompt = length - round(length * answer)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, SHAPE["vocab_size"]) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def collators() -> dict:
    pad = data.PadCollator(0)
    return {"all": pad, "labelled": data.LabelledLogits(pad)}


def step(model, optimizer, batch: dict) -> None:
    import torch

    out = model(**batch, num_items_in_batch=(batch["labels"][..., 1:] != -100).sum())
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


def times(tuner: str, args) -> dict[str, float]:
    model, optimizer = build(tuner)
    collate = collators()
    seconds: dict[str, list[float]] = {"all": [], "labelled": []}
    for i in range(args.steps + 1):  # the first step of each way warms up and is not counted
        batch = rows(args.rows, args.length, args.answer, seed=i)
        for way in ("all", "labelled") if i % 2 else ("labelled", "all"):
            prepared = collate[way](batch)
            t0 = time.perf_counter()
            step(model, optimizer, prepared)
            if i:
                seconds[way].append(time.perf_counter() - t0)
    return {way: statistics.median(s) for way, s in seconds.items()}


def peak_memory(tuner: str, way: str, args) -> float:
    """GiB: the peak resident set of a process while it runs one step `way` (the model and its first optimizer
    step's states included; Linux's /proc)."""
    out = subprocess.run([sys.executable, __file__, "--one-step", way, "--tuners", tuner, "--rows", str(args.rows),
                          "--length", str(args.length), "--answer", str(args.answer)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_gib"]


def one_step(way: str, args) -> None:
    model, optimizer = build(args.tuners[0])
    batch = collators()[way](rows(args.rows, args.length, args.answer, seed=0))
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far was building the model: start it again here
    step(model, optimizer, batch)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(json.dumps({"peak_gib": int(status["VmHWM"].split()[0]) / 2**20}))  # kB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuners", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--answer", type=float, default=0.3)
    ap.add_argument("--one-step", choices=["all", "labelled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_step:
        return one_step(args.one_step, args)
    print(f"Qwen2.5-0.5B's shape, {args.rows} rows x {args.length} tokens, answers {args.answer:.0%} of each row")
    print(f"{'tuner':5} {'s/step all':>10} {'labelled':>9} {'ratio':>6}   {'peak GiB all':>12} {'labelled':>9} "
          f"{'ratio':>6} {'saved':>6}")
    for tuner in args.tuners:
        t = times(tuner, args)
        mem = {way: peak_memory(tuner, way, args) for way in ("all", "labelled")}
        speed, memory = t["all"] / t["labelled"], mem["all"] / mem["labelled"]
        print(f"{tuner:5} {t['all']:10.2f} {t['labelled']:9.2f} {speed:6.2f}   {mem['all']:12.2f} "
              f"{mem['labelled']:9.2f} {memory:6.2f} {mem['all'] - mem['labelled']:6.2f}", flush=True)
        result("labelled_logits", f"{tuner}, Qwen2.5-0.5B's shape: step time with every position's logits / with "
               "the labelled positions' only", speed, ">= 1.0")
        result("labelled_logits", f"{tuner}, Qwen2.5-0.5B's shape: peak memory with every position's logits / with "
               "the labelled positions' only", memory, ">= 1.0")


if __name__ == "__main__":
    main()
