"""`swiftci init`: a first swiftci.yaml and the two workflows, from a few questions — or from flags, so CI and docs
can run it without a terminal.

It asks for the model, the method, the tuner, the data file (and shows the format and row count it detected, and
the problems of any bad rows), the hardware (local GPUs when torch sees some; else the runner labels and the GPU
type), the evaluation tasks and gate, and whether to quantize and deploy. It recommends settings that fit the
hardware by a rule of thumb (`recommend`), writes swiftci.yaml (commented), .github/workflows/swiftci.yml (push)
and .github/workflows/swiftci-pr.yml (pull requests), validates the config, and prints the next command.

Nothing is written until every answer is in, and then each file atomically: Ctrl-C leaves nothing half-written.
An existing file is never overwritten without `--force` (or a yes to the question, in a terminal).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from swiftci.errors import UsageError

# GPU memory in GiB for the types offered when no GPU is visible here
GPU_TYPES = {"H100 / H200 (80 GB+)": 80, "A100 80 GB": 80, "A100 40 GB": 40, "L40S (48 GB)": 48,
             "L4 / A10 (24 GB)": 24, "T4 (16 GB)": 16}
METHODS = ("sft", "dpo", "kto", "orpo", "simpo")
WORKFLOWS = {"push-to-deploy.yml": ".github/workflows/swiftci.yml", "pr-eval.yml": ".github/workflows/swiftci-pr.yml"}


@dataclass
class Answers:
    name: str = "my-model"
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    method: str = "sft"
    tuner: str = "auto"  # auto: what `recommend` says fits
    data: str = "data/train.jsonl"
    gpu_memory_gib: float | None = None  # None: detected, or asked
    gpus: int = 1
    runs_on: list[str] = field(default_factory=lambda: ["self-hosted", "gpu"])
    pr_runs_on: list[str] = field(default_factory=lambda: ["self-hosted", "gpu-pr"])
    tasks: list[str] = field(default_factory=list)
    gate: str | None = None  # `task/metric>=value`
    quantize: bool = False
    deploy: bool = False
    image: str = "ghcr.io/OWNER/my-model"
    max_runtime: str = "6h"


# --- what fits -----------------------------------------------------------------------------------------------------


@dataclass
class Recommendation:
    tuner: str
    batch_size: int
    gradient_accumulation: int
    max_length: int
    gradient_checkpointing: bool
    why: str


def model_billions(model: str, base_dir: Path) -> float | None:
    """Parameters in billions: counted from a local folder's config.json, else read from the name (`…-7B-…`)."""
    config = (base_dir / model / "config.json") if not Path(model).is_absolute() else Path(model) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        h, n, v = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
        if h and n and v:
            inter = c.get("intermediate_size") or 4 * h
            return (n * (4 * h * h + 3 * h * inter) + 2 * v * h) / 1e9
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model)
    return float(m.group(1)) if m else None


def recommend(billions: float | None, memory_gib: float | None, tuner: str = "auto") -> Recommendation:
    """The rule of thumb (README, "swiftci init"): bf16 weights take 2 bytes per parameter; full fine-tuning with
    AdamW holds about 16 (weights, gradients, fp32 master weights and two moments); LoRA about 2 (the frozen base)
    and QLoRA about 0.6 (a 4-bit base), each plus ~3 GiB for activations at batch 1 × 2048 tokens. The cheapest
    tuner that fits 90 % of the memory is chosen for `auto`; the headroom left sets the batch size (effective batch
    16 through gradient accumulation) and turns on gradient checkpointing when it is small."""
    if billions is None or memory_gib is None:
        chosen = "lora" if tuner == "auto" else tuner
        return Recommendation(chosen, 4, 4, 2048, False, "model size or GPU memory unknown: safe defaults")
    need = {"full": 16 * billions + 3, "lora": 2 * billions + 3, "qlora": 0.6 * billions + 3}
    budget = 0.9 * memory_gib
    if tuner == "auto":
        tuner = next((t for t in ("full", "lora", "qlora") if need[t] <= budget), "qlora") if billions < 1 else \
            next((t for t in ("lora", "qlora") if need[t] <= budget), "qlora")
    headroom = (budget - need[tuner]) / budget
    batch = 8 if headroom > 0.5 else 4 if headroom > 0.25 else 1
    why = (f"~{billions:.1f} B parameters, {memory_gib:g} GiB per GPU: {tuner} needs ~{need[tuner]:.0f} GiB "
           f"({max(headroom, 0):.0%} headroom)")
    if need[tuner] > budget:
        why += " — it may not fit; consider a smaller model or a larger GPU"
    return Recommendation(tuner, batch, max(1, 16 // batch), 2048, headroom <= 0.25, why)


def local_gpus() -> tuple[int, float | None, str | None]:
    """(count, GiB of the first, its name) when torch is installed and sees CUDA GPUs; else (0, None, None)."""
    try:
        import torch
    except ImportError:
        return 0, None, None
    if not torch.cuda.is_available():
        return 0, None, None
    props = torch.cuda.get_device_properties(0)
    return torch.cuda.device_count(), props.total_memory / 2**30, props.name


def describe_data(path: Path) -> str:
    """What the data file holds, for the question about it: format, rows, and any bad rows."""
    from swiftci import data

    if not path.is_file():
        return f"{path} does not exist yet: swiftci validate will check it once it does"
    try:
        rows = data.read_jsonl(path)
        fmt = data.detect_format(rows, "auto", path.name)
        data.load_conversations(path, fmt)
    except UsageError as e:
        return f"{path}: {e}"
    return f"{path}: {len(rows)} rows in the {fmt} format, all readable"


# --- the files -------------------------------------------------------------------------------------------------------


def config_text(a: Answers, rec: Recommendation) -> str:
    lines = [
        "# swiftci.yaml, written by `swiftci init`. Every key, its default and what it does: "
        "`swiftci schema --format md`.",
        (f"name: {a.name}", "run ids are <name>-<method>-<yyyymmdd>-<short sha>"),
        "model:", (f"  id: {a.model}", "a hub id or a local folder"),
        "  # revision: <40-character commit sha>    # pin it; the commit used is recorded in run.json either way",
        "data:", (f"  train: {a.data}", "JSONL: chat `messages` rows or alpaca `instruction`/`output` rows"),
        "train:", f"  method: {a.method}", (f"  tuner: {rec.tuner}", rec.why),
        f"  batch_size: {max(rec.batch_size, 2) if a.method == 'kto' else rec.batch_size}",
        (f"  gradient_accumulation: {rec.gradient_accumulation}", "effective batch = batch_size × this × GPUs"),
        f"  max_length: {rec.max_length}", f"  gradient_checkpointing: {str(rec.gradient_checkpointing).lower()}",
        (f"  max_runtime: {a.max_runtime}", "then a checkpoint and exit 3; `swiftci train --resume` goes on"),
    ]
    if a.tasks:
        lines += ["evaluate:", (f"  tasks: [{', '.join(a.tasks)}]", "lm-eval task names, or YAMLs under task_dir")]
        if a.gate:
            metric, value = a.gate.split(">=")
            lines += ["  gates:", f"    - {{metric: {json.dumps(metric.strip())}, min: {float(value)}}}"]
    if a.quantize:
        lines += ["quantize:", "  method: gptq", ("  bits: 4", "gated on held-out perplexity and the eval gates")]
    if a.deploy:
        lines += ["deploy:", "  target: kubernetes", "  engine: vllm",
                  ("  engine_image: vllm/vllm-openai:v0.11.0", "pinned: a moving tag changes what is served"),
                  f"  image: {a.image}", "  gpus: 1", "  smoke:",
                  ('    prompts: [{prompt: "Hello", expect: []}]', "what the new pods must answer")]
    return "\n".join(line if isinstance(line, str) else f"{line[0]:<40} # {line[1]}" for line in lines) + "\n"


def workflow_text(template: str, a: Answers, runs_on: list[str]) -> str:
    """A shipped workflow with the runner labels and (push) the job timeout from max_runtime."""
    labels = json.dumps(runs_on)
    text = re.sub(r"gpu-runs-on: '\[[^\]]*\]'", lambda _m: f"gpu-runs-on: '{labels}'", template)
    text = re.sub(r"runs-on: \[self-hosted, gpu\]", lambda _m: f"runs-on: [{', '.join(runs_on)}]", text)
    minutes, runtime = _timeout_minutes(a.max_runtime), a.max_runtime
    return re.sub(r"train-timeout-minutes: \d+ .*", lambda _m: f"train-timeout-minutes: {minutes}   # train.max_runtime "
                  f"({runtime}) + 30 minutes to save, report and hand on", text)


def _timeout_minutes(max_runtime: str) -> int:
    from swiftci.config import duration_seconds

    return math.ceil(duration_seconds(max_runtime) / 60) + 30  # room to save, report and hand on


def files(a: Answers, rec: Recommendation) -> dict[str, str]:
    out = {"swiftci.yaml": config_text(a, rec)}
    for name, target in WORKFLOWS.items():
        template = resources.files("swiftci").joinpath("workflows", name).read_text()
        out[target] = workflow_text(template, a, a.pr_runs_on if name == "pr-eval.yml" else a.runs_on)
    labels = [x for x in dict.fromkeys(a.runs_on + a.pr_runs_on) if x != "self-hosted"]
    out[".github/zizmor.yml"] = (
        "# zizmor's policy for action references (written by swiftci init): swiftci by its release tag, the pipeline\n"
        "# and its actions being one release; every other action pinned to a full commit SHA. For the strictest\n"
        "# policy pin swiftci to a commit SHA as well, and drop its line.\n"
        "rules:\n  unpinned-uses:\n    config:\n      policies:\n        \"swiftci/*\": ref-pin\n        \"*\": hash-pin\n")
    out[".github/actionlint.yaml"] = ("# The labels of this repository's self-hosted runners, for actionlint (written by "
                                      f"swiftci init).\nself-hosted-runner:\n  labels: [{', '.join(labels)}]\n")
    return out


def write(root: Path, texts: dict[str, str], force: bool) -> list[Path]:
    """Every file or none: refuses before writing when one exists (without `force`), then writes each atomically."""
    from swiftci import reports

    existing = [name for name in texts if (root / name).exists()]
    if existing and not force:
        raise UsageError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --force to "
                         "overwrite, or run swiftci init in another folder")
    return [reports.write_text(root / name, text) for name, text in texts.items()]


# --- the questions ---------------------------------------------------------------------------------------------------


def ask(a: Answers, base_dir: Path) -> Answers:
    """Each question with the flag's value (or the default) preselected; validation as you type. Ctrl-C raises
    KeyboardInterrupt before anything is written."""
    import questionary as q

    def need(answer):
        if answer is None:  # questionary returns None on Ctrl-C
            raise KeyboardInterrupt
        return answer

    a.name = need(q.text("Run name:", default=a.name, validate=_valid_name).ask())
    a.model = need(q.text("Base model (hub id or local folder):", default=a.model,
                          validate=lambda s: bool(s.strip()) or "give a hub id like Qwen/Qwen2.5-0.5B-Instruct").ask())
    a.method = need(q.select("Method:", choices=list(METHODS), default=a.method,
                             instruction="(sft on chats; the others on preference pairs)").ask())
    a.data = need(q.text("Training data (JSONL):", default=a.data).ask())
    print(describe_data(base_dir / a.data))
    _ask_hardware(q, need, a)
    rec = recommend(model_billions(a.model, base_dir), a.gpu_memory_gib)
    choices = [rec.tuner] + [t for t in ("lora", "qlora", "full") if t != rec.tuner]
    a.tuner = need(q.select(f"Tuner (recommended: {rec.tuner} — {rec.why}):", choices=choices,
                            default=a.tuner if a.tuner in choices else rec.tuner).ask())
    tasks = need(q.text("lm-eval tasks, comma-separated (empty: no evaluation):", default=",".join(a.tasks)).ask())
    a.tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if a.tasks:
        gate = need(q.text("Gate, e.g. hellaswag/acc>=0.5 (empty: none):", default=a.gate or "",
                           validate=lambda s: not s or bool(_GATE.match(s)) or "write task/metric>=number").ask())
        a.gate = gate or None
    a.quantize = need(q.confirm("Quantize to 4-bit GPTQ (gated on perplexity)?", default=a.quantize).ask())
    a.deploy = need(q.confirm("Deploy to Kubernetes on pushes to the default branch?", default=a.deploy).ask())
    if a.deploy:
        a.image = need(q.text("Image repository:", default=a.image).ask())
    a.max_runtime = need(q.text("Longest a training may run:", default=a.max_runtime, validate=_valid_runtime).ask())
    return a


def _ask_hardware(q, need, a: Answers) -> None:
    count, memory, name = local_gpus()
    if count:
        print(f"GPUs here: {count} × {name} ({memory:.0f} GiB)")
        a.gpus, a.gpu_memory_gib = count, a.gpu_memory_gib or round(memory)
        return
    labels = need(q.text("GPU runner labels, comma-separated:", default=", ".join(a.runs_on)).ask())
    a.runs_on = [x.strip() for x in labels.split(",") if x.strip()]
    if a.gpu_memory_gib is None:
        kind = need(q.select("GPU type of those runners:", choices=list(GPU_TYPES)).ask())
        a.gpu_memory_gib = GPU_TYPES[kind]


_GATE = re.compile(r"^[^/\s]+/[^/\s>]+\s*>=\s*\d+(\.\d+)?$")


def _valid_name(text: str) -> bool | str:
    return bool(re.fullmatch(r"[a-z0-9][a-z0-9-]*", text)) or "lowercase letters, digits and dashes, e.g. support-bot"


def _valid_runtime(text: str) -> bool | str:
    from swiftci.config import duration_seconds

    try:
        return duration_seconds(text) > 0 or "longer than 0"
    except ValueError as e:
        return str(e)


def run(a: Answers, root: Path, *, interactive: bool, force: bool, say=print) -> list[Path]:
    """Ask (in a terminal), recommend, write, validate; returns the files written."""
    if interactive:
        a = ask(a, root)
    if a.gate and not _GATE.match(a.gate):
        raise UsageError(f"--gate {a.gate!r}: write task/metric>=number, e.g. hellaswag/acc>=0.5")
    rec = recommend(model_billions(a.model, root), a.gpu_memory_gib, a.tuner)
    texts = files(a, rec)
    existing = [n for n in texts if (root / n).exists()]
    if existing and interactive and not force:
        import questionary as q

        force = bool(q.confirm(f"Overwrite {', '.join(existing)}?", default=False).ask())
    written = write(root, texts, force)
    _validate(root / "swiftci.yaml", say)
    for path in written:
        say(f"wrote {path.relative_to(root)}")
    say("next: swiftci validate -c swiftci.yaml, then swiftci run -c swiftci.yaml (or push: the workflow trains)")
    return written


def _validate(path: Path, say) -> None:
    """The written config, as `swiftci validate` reads it (the data file may not exist yet: then say so)."""
    from swiftci import config
    from swiftci.errors import ConfigError

    try:
        config.load(path)
    except ConfigError as e:
        problems = [p for p in e.problems if "data.train" not in p]
        if problems:
            raise
        say("note: " + "; ".join(e.problems))
