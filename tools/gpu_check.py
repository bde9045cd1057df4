"""GPU truth kit: what only a GPU can show, measured in one prepared call (no network, minutes of device time).

    python tools/gpu_check.py [--out DIR] [--wheels DIR]    # on a CUDA machine: `make gpu-check`
    python tools/gpu_check.py --smoke --out DIR             # tiny model, CPU, a few steps (run by the test suite)

On a machine that has PyTorch, transformers, peft and accelerate (the lent GPU kind has them), it installs what
swiftci still lacks from a folder of wheels carried with the working tree (`make gpu-wheels` downloads them here,
~3 MB), builds a random-initialised Llama of about 0.55 B parameters from a config (no hub), generates chat rows of
varied length, and measures:

- swiftci train (bf16; lora and full) against the plain Trainer (+ peft) script of bench/baselines on the same
  model, rows and settings: non-padding tokens per second of training-loop time, their ratio, the model FLOPs
  utilisation (6·N·tokens/s for full, 4·N for lora — forward 2N, backward through frozen weights 2N — over the
  GPU's dense bf16 peak) and peak allocated memory;
- the memory estimate (`swiftci estimate`, train's pre-flight) against torch.cuda.max_memory_allocated of swiftci
  train, lora and full, on rows that fill max_length (goal: within ±15 %);
- packed vs padded batches and QLoRA: measured when swiftci (and the wheels) offer them, otherwise reported as
  skipped with the reason.

Writes gpu_check.json and gpu_check.md to --out (default: $OUT, else ./gpu-check-out). A part that cannot run is
reported as skipped with its reason; the script fails only when nothing could be measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "bench/baselines/plain_trainer.py"
WHEELS = ROOT / "tools/gpu-wheels"
# dense bf16 peak (TFLOP/s) by device name; the H200 figure is the vendor's, ~790 measured on the lent machine
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
SIZES = {  # (hidden, intermediate, layers, heads, vocab, rows, max_length, batch)
    "gpu": (1536, 4096, 16, 12, 32000, 1200, 1024, 8),
    "smoke": (64, 128, 2, 4, 512, 48, 128, 4),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps: checks the kit itself")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
    ap.add_argument("--wheels", type=Path, default=WHEELS, help="wheels of what swiftci needs beyond the machine's")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    started = time.monotonic()
    result = {"date": time.strftime("%Y-%m-%d"), "mode": "smoke" if args.smoke else "gpu", "machine": machine(),
              "parts": {}}
    if not args.smoke and not result["machine"]["cuda"]:
        result["parts"]["all"] = skipped("no CUDA device: run with --smoke for the CPU check of the kit")
        return finish(args.out, result, started)
    env = prepare(work, args.wheels)
    model_dir, n_params = build_model(work / "model", SIZES[result["mode"]])
    data = write_rows(work / "rows.jsonl", SIZES[result["mode"]][5])
    result["model_parameters"] = n_params
    for tuner in ("lora", "full"):
        result["parts"][f"train_{tuner}"] = compare(work / tuner, model_dir, data, tuner, n_params, result, env)
    result["parts"]["memory_estimate"] = memory_estimate(work / "memory", model_dir, result, env)
    result["parts"].update(optional_parts())
    return finish(args.out, result, started)


# --- the machine and what it has ---------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for name in ("transformers", "peft", "accelerate"):
        info[name] = _version(name)
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(),
                    peak_bf16_tflops=next((v for k, v in PEAK_BF16_TFLOPS.items() if k in props.name), None))
    return info


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def prepare(work: Path, wheels: Path) -> dict:
    """An environment in which `python -m swiftci.cli` runs from this tree: swiftci's own dependencies that the
    machine lacks are installed from the carried wheels into work/site (never into the machine's Python)."""
    missing = [m for m in ("click", "pydantic", "yaml", "requests", "matplotlib") if importlib.util.find_spec(m) is None]
    site = work / "site"
    if missing:
        if not any(wheels.glob("*.whl")):
            raise SystemExit(f"missing {', '.join(missing)} and no wheels in {wheels}: run `make gpu-wheels` first")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                        "--target", str(site), *[{"yaml": "pyyaml"}.get(m, m) for m in missing]], check=True)
    sys.path[:0] = [str(ROOT), str(site)]  # this process reads swiftci's config too
    path = os.pathsep.join([str(ROOT), str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


# --- model and rows ----------------------------------------------------------------------------------------------


def build_model(out: Path, size: tuple) -> tuple[Path, int]:
    """A random-initialised Llama with the tiny example's character tokenizer (its chat template included)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "examples/tiny"))
    from build_base_model import build_tokenizer, pretraining_lines

    hidden, inter, layers, heads, vocab, _, max_length, _ = size
    tokenizer = build_tokenizer(pretraining_lines(200))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def write_rows(path: Path, n: int) -> Path:
    """Chat rows whose lengths vary like instruction data (a few words to a long paragraph)."""
    rng = random.Random(7)
    with open(path, "w") as f:
        for _ in range(n):
            words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
                             for _ in range(rng.randint(3, 120)))
            f.write(json.dumps({"messages": [{"role": "user", "content": words},
                                             {"role": "assistant", "content": words[::-1][: rng.randint(10, 300)]}]})
                    + "\n")
    return path


# --- swiftci against the plain Trainer -------------------------------------------------------------------------


def compare(work: Path, model_dir: Path, data: Path, tuner: str, n_params: int, result: dict, env: dict) -> dict:
    """One epoch over the same rows, swiftci then the baseline, each in its own process."""
    _, _, _, _, _, _, max_length, batch = SIZES[result["mode"]]
    precision = "bf16" if result["machine"].get("bf16") else "fp32"
    try:
        ours = run_swiftci(work, model_dir, data, tuner, batch, max_length, precision, env)
        base = run_baseline(model_dir, data, tuner, batch, max_length, precision, env)
    except subprocess.CalledProcessError as e:
        return {"status": "failed", "reason": (e.stderr or "")[-1500:]}
    part = {"status": "measured", "precision": precision, "batch_size": batch, "max_length": max_length,
            "swiftci_tokens_per_second": ours["tokens_per_second"], "trainer_tokens_per_second": base["tokens_per_second"],
            "ratio": round(ours["tokens_per_second"] / base["tokens_per_second"], 3),
            "swiftci_peak_memory_mb": ours["peak_memory_mb"], "trainer_peak_memory_mb": base["peak_memory_mb"]}
    peak = result["machine"].get("peak_bf16_tflops")
    flops_per_token = (6 if tuner == "full" else 4) * n_params
    for who in ("swiftci", "trainer"):
        tps = part[f"{who}_tokens_per_second"]
        part[f"{who}_mfu"] = round(flops_per_token * tps / (peak * 1e12), 4) if peak else None
    return part


def run_swiftci(work: Path, model_dir: Path, data: Path, tuner: str, batch: int, max_length: int, precision: str,
                env: dict) -> dict:
    cfg = {"name": "gpu-check", "output_dir": str(work / "out"), "model": {"id": str(model_dir)},
           "data": {"train": str(data), "format": "messages"},
           "train": {"tuner": tuner, "precision": precision, "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
                     "learning_rate": 1e-4, "batch_size": batch, "max_length": max_length, "epochs": 1,
                     "save_steps": 10**6, "logging_steps": 10, "seed": 42}}
    work.mkdir(parents=True, exist_ok=True)
    (work / "swiftci.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "swiftci.cli", "train", "-c", str(work / "swiftci.yaml")], check=True,
                   capture_output=True, text=True, env=env)
    metrics = json.loads((work / "out/train/train_report.json").read_text())["metrics"]
    return {"tokens_per_second": metrics["tokens_per_second"], "peak_memory_mb": metrics["peak_memory_mb"]}


def run_baseline(model_dir: Path, data: Path, tuner: str, batch: int, max_length: int, precision: str,
                 env: dict) -> dict:
    proc = subprocess.run([sys.executable, str(BASELINE), str(model_dir), str(data), tuner, str(batch),
                           str(max_length), "0", "1e-4", precision], check=True, capture_output=True, text=True,
                          env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the memory pre-flight's estimate against the measured peak ----------------------------------------------------


def memory_estimate(work: Path, model_dir: Path, result: dict, env: dict) -> dict:
    """`swiftci estimate`'s figure (without its CUDA allowance) against torch.cuda.max_memory_allocated of swiftci
    train, lora and full, on rows that all fill max_length (the estimate's case); the goal is within ±15 %."""
    if not result["machine"]["cuda"]:
        return skipped("no CUDA: the train report's peak here is the host's RSS, not tensor memory "
                       "(bench/estimate_accuracy.py compares the estimate with torch's tensor peak on CPU)")
    from swiftci import config, estimate

    _, _, _, _, _, _, max_length, batch = SIZES[result["mode"]]
    precision = "bf16" if result["machine"].get("bf16") else "fp32"
    rows = work / "long-rows.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "say"}, {
        "role": "assistant", "content": "".join(rng.choice(string.ascii_lowercase) for _ in range(2 * max_length))}]})
        + "\n" for _ in range(4 * batch)))
    part: dict = {"status": "measured", "precision": precision, "batch_size": batch, "max_length": max_length}
    for tuner in ("lora", "full"):
        cfg = {"name": "gpu-check-memory", "output_dir": str(work / tuner), "model": {"id": str(model_dir)},
               "data": {"train": str(rows), "format": "messages"},
               "train": {"tuner": tuner, "precision": precision, "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
                         "batch_size": batch, "max_length": max_length, "max_steps": 3, "save_steps": 10**6,
                         "logging_steps": 1, "seed": 42}}
        path = work / f"{tuner}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        try:
            subprocess.run([sys.executable, "-m", "swiftci.cli", "train", "-c", str(path)], check=True,
                           capture_output=True, text=True, env=env)
        except subprocess.CalledProcessError as e:
            return {"status": "failed", "reason": (e.stderr or "")[-1500:]}
        measured = json.loads((work / tuner / "train/train_report.json").read_text())["metrics"]["peak_memory_mb"]
        verdict = estimate.judge(config.load(path), estimate.Parallelism(), None, precision=precision)
        part[f"{tuner}_estimate_mib"] = round(verdict.estimate.tensors / 2**20, 1)
        part[f"{tuner}_measured_mib"] = measured
        part[f"{tuner}_ratio"] = round(verdict.estimate.tensors / 2**20 / measured, 3)
    return part


# --- what swiftci does not offer yet -----------------------------------------------------------------------------


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def optional_parts() -> dict:
    """Each part runs once swiftci offers it; until then it says why it was skipped."""
    from swiftci import config

    train_keys = set(config.TrainConfig.model_fields)
    parts = {}
    parts["packed_vs_padded"] = skipped("swiftci has no packed batches yet (train.packing: the throughput issue)") \
        if "packing" not in train_keys else skipped("packing exists: add its measurement here")
    parts["qlora"] = skipped("bitsandbytes is not installed here and not among the carried wheels") \
        if importlib.util.find_spec("bitsandbytes") is None else skipped("bitsandbytes found: add the QLoRA run")
    return parts


# --- the table -----------------------------------------------------------------------------------------------------


def finish(out: Path, result: dict, started: float) -> int:
    result["seconds"] = round(time.monotonic() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    measured = [p for p in result["parts"].values() if p["status"] == "measured"]
    return 0 if measured or result["parts"].get("all") else 1


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"GPU check, {result['date']}, {result['mode']} mode: {m.get('device', 'CPU')} · torch {m['torch']} · "
             f"transformers {m['transformers']} · peft {m['peft']}"
             + (f" · model {result['model_parameters'] / 1e6:,.1f} M parameters" if "model_parameters" in result else ""),
             "", "| part | swiftci tok/s | Trainer tok/s | ratio | MFU swiftci / Trainer | peak MiB swiftci / Trainer |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, p in result["parts"].items():
        if p["status"] != "measured":
            lines.append(f"| {name} | {p['status']}: {p['reason'][:200]} | | | | |")
            continue
        if name == "memory_estimate":
            lines.append(f"| {name} ({p['precision']}, batch {p['batch_size']} × {p['max_length']}) | estimate / "
                         f"peak allocated: lora {p['lora_ratio']:.2f} ({p['lora_estimate_mib']:,.0f} / "
                         f"{p['lora_measured_mib']:,.0f} MiB), full {p['full_ratio']:.2f} "
                         f"({p['full_estimate_mib']:,.0f} / {p['full_measured_mib']:,.0f} MiB) | | | | |")
            continue
        mfu = "—" if p["swiftci_mfu"] is None else f"{p['swiftci_mfu']:.1%} / {p['trainer_mfu']:.1%}"
        lines.append(f"| {name} ({p['precision']}, batch {p['batch_size']}) | {p['swiftci_tokens_per_second']:,.0f} | "
                     f"{p['trainer_tokens_per_second']:,.0f} | {p['ratio']:.2f} | {mfu} | "
                     f"{_mib(p['swiftci_peak_memory_mb'])} / {_mib(p['trainer_peak_memory_mb'])} |")
    return "\n".join(lines) + "\n"


def _mib(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
