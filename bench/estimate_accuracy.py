"""The memory estimate against measured peak memory: the tiny example model, full and LoRA, with and without
gradient checkpointing, on this machine (CPU, fp32).

    .venv/bin/python bench/estimate_accuracy.py [--batch 16] [--length 64] [--steps 3]

Each case runs a few training steps the way swiftci trains (the model loaded in fp32, peft's LoRA on all Linear
layers, torch's AdamW, transformers' gradient checkpointing) on full batches of random token ids, in its own process,
and measures the peak of
live tensor memory with torch's MemTracker (torch.distributed._tools), which follows every tensor storage the model,
autograd and the optimizer create, by the same components the estimate has. (The growth of the process's peak
resident set size is no measure at this size: ~110 MiB of library code and buffers that transformers loads with the
model drown a training of ~25 MiB.)

Prints the estimate (without its CUDA allowance: there is no CUDA here) divided by the measured peak. On a GPU the comparison is
tools/gpu_check.py's (estimate vs torch.cuda.max_memory_allocated; the goal there is within ±15 %).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_result.py, also when a test imports this file
from _result import result  # noqa: E402 - one RESULT line per figure, for `make bench`

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples/tiny/base-model"
CASES = (("full", False), ("full", True), ("lora", False), ("lora", True))


def measure(model_dir: Path, tuner: str, batch: int, length: int, checkpointing: bool, steps: int = 3) -> dict:
    """Peak tensor bytes (MemTracker, by component) and peak RSS growth over `steps` training steps, in this
    process (call it in a fresh one for a clean RSS figure)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if tuner == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if tuner == "lora":
            model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    tracker = MemTracker()
    no_hook = SimpleNamespace(remove=lambda: None)
    for p in model.parameters():  # MemTracker hooks every parameter's gradient, which fails on frozen ones
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (no_hook, no_hook)
    tracker.track_external(model, optimizer)
    with tracker:
        for _ in range(steps):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            tracker.reset_mod_stats()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {"tensors_bytes": peak["Total"], "by_kind": {str(k.value): v for k, v in peak.items() if k != "Total"}}


def estimated(model_dir: Path, tuner: str, batch: int, length: int, checkpointing: bool) -> dict:
    from swiftci import estimate

    shape = estimate.model_shape(json.loads((Path(model_dir) / "config.json").read_text()))
    setup = estimate.Setup(tuner=tuner, precision="fp32", batch_size=batch, gradient_accumulation=1,
                           rows_per_example=1, max_length=length, gradient_checkpointing=checkpointing, lora_rank=16,
                           lora_targets="all-linear", double_quant=True)
    est = estimate.estimate(shape, setup, cuda_allowance=0)
    return {"tensors_bytes": est.tensors, "weights": est.weights, "gradients": est.gradients,
            "optimizer": est.optimizer, "activations": est.activations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one measurement, in a child process
    args = ap.parse_args()
    if args.case:
        tuner, ckpt = args.case.split(":")
        print(json.dumps(measure(MODEL, tuner, args.batch, args.length, ckpt == "1", args.steps)))
        return
    print(f"tiny model, batch {args.batch} × {args.length} tokens, fp32 on CPU; estimate / measured peak")
    print("| tuner | checkpointing | estimate MiB | measured MiB | estimate / measured |")
    print("| --- | --- | ---: | ---: | ---: |")
    for tuner, ckpt in CASES:
        proc = subprocess.run([sys.executable, __file__, "--case", f"{tuner}:{int(ckpt)}", "--batch", str(args.batch),
                               "--length", str(args.length), "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        est = estimated(MODEL, tuner, args.batch, args.length, ckpt)["tensors_bytes"]
        mib = 2**20
        print(f"| {tuner} | {'on' if ckpt else 'off'} | {est / mib:.1f} | {got['tensors_bytes'] / mib:.1f} | "
              f"{est / got['tensors_bytes']:.2f} |")
        result("estimate_accuracy", f"{tuner}, checkpointing {'on' if ckpt else 'off'}: estimated / measured peak "
               "(tensors, CPU)", est / got["tensors_bytes"], None)


if __name__ == "__main__":
    main()
