"""The quantize stage: GPTQ or AWQ with gptqmodel, then a quality gate on what will actually ship.

1. Take the trained model (merging a LoRA adapter into its base first), or `--model DIR`.
2. Check that the quantization fits the model (group size divides every layer's input size) — exit 2 if not.
3. Quantize with calibration text from the training data (or `quantize.calibration.file`).
4. Measure perplexity on held-out rows before and after (their assistant tokens, like the validation loss), and
   size on disk before and after.
5. Re-run the evaluate section's gates on the quantized model (`gates.reuse_eval_gates`), against the unquantized
   model's eval report when there is one.

Outputs in `<output_dir>/quantize/`:
  model/                  serving-ready: config.json with quantization_config, weights, tokenizer, chat template
  merged/                 the adapter merged into the base (only when train wrote no merged model)
  evaluate/               eval_report.json/.md of the quantized model (when eval gates are reused)
  quantize_report.json    {"version": 2, "stage": "quantize", "status", "outputs": {"model": "model"},
                          "metrics": {size, perplexity, time}, "gates": [...], "passed"}
  quantize_report.md
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swiftci import data as datalib
from swiftci import models, provenance, quiet, reports, stages
from swiftci.config import Config, group_size_problem
from swiftci.errors import GateFailed, StageError, SwiftCIError, UsageError

STAGE = "quantize"
QUANTIZER_LOG = "quantizer.log"


def run(cfg: Config, *, model_dir: Path | None = None) -> dict:
    qc = cfg.quantize
    if qc is None:
        raise UsageError(f"{cfg.source}: no `quantize` section; add one (see examples/tiny/swiftci.yaml)")
    os.environ["TQDM_DISABLE"] = "1"  # before anything imports tqdm, which reads it once: no per-batch bars in CI
    out = cfg.stage_dir(STAGE)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    head = reports.new_report(STAGE, stages.RUNNING, run_id=stages.train_run_id(cfg), method=qc.method,
                              bits=qc.bits, group_size=qc.group_size, backend=qc.backend,
                              fingerprint=stages.fingerprint(cfg, STAGE) if model_dir is None else None,
                              inputs=provenance.stage_inputs(cfg, STAGE))  # the calibration data it read
    _write(out, {**head, "passed": False})
    try:
        check_architecture(cfg, model_dir)
        source, source_label = _source(cfg, model_dir, out)
        check_fits(source, qc.group_size)
        report = _quantize_and_measure(cfg, head, source, source_label, out, started)
    except Exception as e:  # whatever broke is recorded in the report, then raised
        _write(out, {**head, "status": "error", "passed": False, "error": stages.error_of(e), "gates": []})
        if isinstance(e, SwiftCIError):
            raise
        raise StageError(f"quantization failed: {type(e).__name__}: {e}") from e
    _write(out, report)
    if not report["passed"]:
        failed = [g for g in report["gates"] if not g["passed"]]
        raise GateFailed("quantization gate failed: " + "; ".join(f"{g['metric']} {g['reason']}" for g in failed)
                         + f" (report: {out / stages.QUANTIZE.markdown})")
    return report


# --- what to quantize ------------------------------------------------------------------------------------------


def _source(cfg: Config, model_dir: Path | None, out: Path) -> tuple[Path, str]:
    """A full (unquantized) model folder to quantize, merging a LoRA adapter first when that is what we have."""
    if model_dir is not None:
        path = Path(model_dir).resolve()
        if not path.is_dir():
            raise UsageError(f"--model: {model_dir} is not a folder")
        if models.is_adapter_dir(path):
            return _merge(cfg, path, out), f"{path.name} (adapter merged into the base)"
        if not (path / "config.json").is_file():
            raise UsageError(f"--model: {model_dir} holds no model (config.json)")
        return path, path.name
    if cfg.train is None:
        from swiftci import hub

        local = cfg.model_local_path or hub.prepare(cfg).path  # a hub id: downloaded and checked file by file
        return local, cfg.model.id
    trained = stages.produced(cfg, "train", prefer=("model", "adapter"))  # its files checked against train's record
    if trained.kind == "model":
        return trained.path, f"train/{trained.path.name}"
    return _merge(cfg, trained.path, out), "train/adapter (merged into the base)"


def _merge(cfg: Config, adapter: Path, out: Path) -> Path:
    """Merge a LoRA adapter into its base in full precision; quantizing a merged model is what ships."""
    import torch

    target = out / "merged"
    print(f"merging {adapter.name} into {cfg.model.id} before quantizing", flush=True)
    tokenizer = models.load_tokenizer(str(adapter), None, adapter)
    base = models.load_causal_lm(cfg.model.id, cfg.model.revision, cfg.model_local_path,
                                 dtype=models.compute_dtype("auto")[1])
    tmp = out / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    models.merge_adapter(base, adapter, tmp, tokenizer)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def check_architecture(cfg: Config, model_dir: Path | None) -> None:
    """A vision-language model is quantized only where gptqmodel knows its architecture (which layers are the
    language model's, how the vision tower is kept in 16 bits); any other is refused before anything is merged or
    loaded (exit 2)."""
    config = _model_config(cfg, model_dir)
    if "vision_config" not in config:
        return
    try:
        from gptqmodel.models.auto import SUPPORTED_MODELS
    except ImportError:
        raise UsageError("quantize.backend: gptqmodel is not installed; pip install 'swiftci[quantize]'") from None
    kind = config.get("model_type")
    if kind not in SUPPORTED_MODELS:
        raise UsageError(f"quantize: gptqmodel cannot quantize the vision-language architecture {kind!r} (it knows "
                         "e.g. qwen2_vl, qwen2_5_vl, qwen3_vl, gemma3, internvl_chat, mllama, ovis); remove the "
                         "quantize section for this model, or ship it unquantized")


def _model_config(cfg: Config, model_dir: Path | None) -> dict:
    """config.json of --model when it holds a model, else of the base model (an adapter shares its architecture)."""
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        return json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.model_local_path is not None:
        return json.loads((cfg.model_local_path / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(cfg.model.id, "config.json", revision=cfg.model.revision)).read_text())


def check_fits(model_dir: Path, group_size: int) -> None:
    """Impossible combinations are usage errors (exit 2) with the fix, found before anything heavy is loaded."""
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise UsageError(f"{model_dir.name} is already quantized ({config['quantization_config'].get('quant_method')}); "
                         "quantize the unquantized model")
    problem = group_size_problem(config, group_size)
    if problem:
        raise UsageError(f"quantize.group_size: {problem}")


# --- quantizing and measuring ----------------------------------------------------------------------------------


def _calibration_texts(cfg: Config, tokenizer: Any) -> list[str]:
    qc = cfg.quantize.calibration
    if qc.file is not None:
        path = cfg.resolve(qc.file)
        rows = datalib.read_jsonl(path)
        texts = [r["text"] for r in rows if isinstance(r.get("text"), str)]
        if not texts:
            fmt = datalib.detect_format(rows, "auto", path.name)
            texts = [tokenizer.apply_chat_template(datalib.to_messages(r, fmt, path.name), tokenize=False)
                     for r in rows]
    elif cfg.data is not None:
        path = cfg.resolve(cfg.data.train)
        convs, _ = datalib.load_conversations(path, cfg.data.format)
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    else:
        raise UsageError("quantize.calibration.file: needed when the config has no `data` section")
    texts = texts[: qc.samples]
    if len(texts) < qc.samples:
        print(f"calibration: {len(texts)} rows available (quantize.calibration.samples asks for {qc.samples})")
    return [_truncate(tokenizer, t, qc.max_length) for t in texts]


def _truncate(tokenizer: Any, text: str, max_length: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_length else tokenizer.decode(ids[:max_length])


def heldout_examples(cfg: Config, tokenizer: Any) -> list[dict]:
    """Held-out rows for perplexity, tokenized like training: the validation rows (else the last training rows),
    scored on their assistant tokens only, so perplexity is exp(validation loss) as training reports it. Without
    a data section, the calibration text is scored on every token."""
    gates = cfg.quantize.gates
    if cfg.data is None:
        texts = _calibration_texts(cfg, tokenizer)[: gates.perplexity_samples]
        ids = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=gates.perplexity_max_length)
               ["input_ids"] for t in texts]
        return [{"input_ids": x, "labels": x} for x in ids]
    path = cfg.resolve(cfg.data.validation or cfg.data.train)
    convs, _ = datalib.load_conversations(path, cfg.data.format)
    convs = convs[: gates.perplexity_samples] if cfg.data.validation else convs[-gates.perplexity_samples:]
    examples, _ = datalib.tokenize_sft(convs, tokenizer, gates.perplexity_max_length, path.name)
    return examples


def _measured_on(cfg: Config, rows: int) -> str:
    """What heldout_examples scores, in words, for the report."""
    if cfg.data is None:
        return f"every token of {rows} calibration texts"
    if cfg.data.validation:
        return (f"the assistant tokens of the first {rows} rows of {Path(cfg.data.validation).name} "
                "(exp of the validation loss)")
    return f"the assistant tokens of the last {rows} rows of {Path(cfg.data.train).name}"


def perplexity(model_dir: Path, examples: list[dict], batch_size: int = 4) -> float:
    """exp(mean negative log-likelihood of the labelled tokens) of `examples` ({input_ids, labels}, -100 where a
    token is not scored) under the model in `model_dir`, quantized or not."""
    import torch
    from transformers import AutoModelForCausalLM

    with models.offline_if_local(True):
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                     device_map={"": 0} if torch.cuda.is_available() else None)
    model.eval()
    device = next(model.parameters()).device
    collate = datalib.PadCollator(0)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i: i + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:].reshape(-1)
            # cross_entropy never materialises a float32 log-softmax copy of (batch × length × vocabulary)
            token_nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.clamp(min=0), reduction="none")
            keep = targets != -100
            nll += token_nll[keep].sum().item()
            count += int(keep.sum().item())
            del logits, token_nll
    del model
    return math.exp(nll / max(count, 1))


@contextlib.contextmanager
def _quantizer_output(log: Path, append: bool = False) -> Iterator[None]:
    """gptqmodel draws a progress bar per module and layer and logs every kernel choice: hundreds of lines for one
    model, unreadable in a CI log. Its output goes to `log`; when it fails, the log's last lines are shown with the
    error. A GateFailed is no crash: the report says why."""
    with quiet.captured(log, append=append, expected=(GateFailed,), label="quantizer output"):
        yield
    if not append:
        print(f"quantizer output: {log}", file=sys.stderr)


def _quantize(cfg: Config, source: Path, target: Path, calibration: list[str]) -> float:
    """Quantize `source` into `target` with gptqmodel; returns the seconds spent quantizing."""
    import torch

    qc = cfg.quantize
    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        # gptqmodel's CPU pool needs as many workers as it asks for, and its C++ packer costs a ~30 s compile on
        # first use; the Python packer writes byte-identical weights.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
        os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError:
        raise UsageError("quantize.backend: gptqmodel is not installed; pip install 'swiftci[quantize]'") from None
    from transformers import AutoTokenizer

    if qc.method == "gptq":
        qconfig = QuantizeConfig(bits=qc.bits, group_size=qc.group_size, desc_act=qc.desc_act)
        extra: dict[str, Any] = {}
    else:
        qconfig = QuantizeConfig(bits=qc.bits, group_size=qc.group_size, method="awq", format="gemm")
        extra = {} if on_cuda else {"backend": "torch"}  # AWQ's default GEMM packer needs CUDA
    if on_cuda:
        dtype = torch.float16
    elif qc.method == "awq":
        dtype = torch.bfloat16  # gptqmodel's CPU AWQ kernels take fp16/bf16 only
    else:
        source_dtype = json.loads((source / "config.json").read_text()).get("dtype") or "float32"
        dtype = getattr(torch, source_dtype, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    t0 = time.monotonic()
    model = GPTQModel.load(str(source), qconfig, device="cuda:0" if on_cuda else "cpu", dtype=dtype)
    model.quantize(calibration, tokenizer=tokenizer, batch_size=qc.calibration.batch_size, **extra)
    seconds = time.monotonic() - t0
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    # Serve exactly the generation settings the model was trained and evaluated with (gptqmodel writes its own).
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", tmp / "generation_config.json")
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file() and not (tmp / name).is_file():
            shutil.copy2(source / name, tmp / name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return seconds


def _quantize_and_measure(cfg: Config, base: dict, source: Path, source_label: str, out: Path,
                          started: float) -> dict:
    from transformers import AutoTokenizer

    qc = cfg.quantize
    target = out / "model"
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    calibration = _calibration_texts(cfg, tokenizer)
    heldout = heldout_examples(cfg, tokenizer)
    batch = qc.gates.perplexity_batch_size
    source, target = source.resolve(), target.resolve()
    # gptqmodel writes per-module logs into ./logs of the working directory: inside the stage's folder, they stay
    # out of the user's repository
    with _quantizer_output(out / QUANTIZER_LOG), contextlib.chdir(out):
        ppl_before = perplexity(source, heldout, batch)
        quantize_seconds = _quantize(cfg, source, target, calibration)
        ppl_after = perplexity(target, heldout, batch)
    size_before, size_after = models.weights_bytes(source), models.weights_bytes(target)
    increase = (ppl_after - ppl_before) / ppl_before * 100
    metrics = {
        "size_before_bytes": size_before,
        "size_after_bytes": size_after,
        "size_ratio": round(size_after / size_before, 4) if size_before else None,
        "perplexity_before": round(ppl_before, 4),
        "perplexity_after": round(ppl_after, 4),
        "perplexity_increase_pct": round(increase, 3),
        "perplexity_rows": len(heldout),
        "perplexity_measured_on": _measured_on(cfg, len(heldout)),
        "calibration_rows": len(calibration),
        "quantize_seconds": round(quantize_seconds, 2),
    }
    limit = qc.gates.max_ppl_increase_pct
    ppl_ok = math.isfinite(ppl_after) and increase <= limit + 1e-9
    gates = [{"metric": "perplexity", "rule": f"increase ≤ {limit:g}%", "value": round(increase, 3),
              "passed": ppl_ok,
              "reason": "ok" if ppl_ok else f"perplexity rose {increase:.2f}% ({ppl_before:.4g} → {ppl_after:.4g}), "
                                            f"more than {limit:g}%"}]
    evaluation = None
    if qc.gates.reuse_eval_gates and cfg.evaluate is not None:
        with _quantizer_output(out / QUANTIZER_LOG, append=True):  # loading a GPTQ/AWQ model logs as much
            evaluation = _reuse_eval_gates(cfg, target, out)
        gates += [{**g, "metric": f"eval:{g['metric']}"} for g in evaluation["gates"]]
    passed = all(g["passed"] for g in gates)
    metrics["wall_seconds"] = round(time.monotonic() - started, 2)
    files = stages.record_files(out, ["model"])  # deploy ships only these bytes
    from_train = source_label.startswith("train/")
    train_record = (stages.read_report(cfg, "train") or {}).get("files_sha256") if from_train else None
    report = {**base, "status": "passed" if passed else "failed", "passed": passed, "source_model": source_label,
              "outputs": {"model": "model"}, "files": files, "files_sha256": stages.files_digest(files),
              "verified": {"train": train_record} if train_record else None,
              "quantizer_log": QUANTIZER_LOG, "metrics": metrics, "gates": gates}
    if evaluation is not None:
        report["eval"] = {"report": f"evaluate/{stages.EVALUATE.report}", "baseline": evaluation["baseline"],
                          "metrics": evaluation["metrics"], "passed": evaluation["passed"],
                          "model_sha256": evaluation["model"].get("sha256")}
    return report


def _reuse_eval_gates(cfg: Config, target: Path, out: Path) -> dict:
    """The evaluate section's gates on the quantized model; deltas against this run's unquantized eval report."""
    from swiftci import evaluate

    unquantized = stages.this_runs_report(cfg, "evaluate")
    baseline = str(stages.report_path(cfg, "evaluate")) if unquantized is not None else None
    try:
        return evaluate.run(cfg, model_dir=target, baseline=baseline, out_dir=out / "evaluate")
    except GateFailed as e:
        return e.details


# --- reports ---------------------------------------------------------------------------------------------------


def _write(out: Path, report: dict) -> None:
    reports.write_json(out / stages.QUANTIZE.report, report)
    reports.write_text(out / stages.QUANTIZE.markdown, render_markdown(report))


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def render_markdown(report: dict) -> str:
    status = report.get("status")
    title = f"### swiftci quantize — {report.get('method', '?').upper()} {report.get('bits')}-bit"
    if status == "running":
        return f"{title}\n\n⏳ **RUNNING**\n"
    if status == "error":
        return f"{title}\n\n❌ **FAIL** — quantization could not run: {stages.failure_reason(report)}\n"
    gates = report.get("gates") or []
    failed = [g for g in gates if not g["passed"]]
    verdict = ("✅ **PASS** — all gates passed" if not failed else
               f"❌ **FAIL** — {len(failed)} of {len(gates)} gates failed: "
               + "; ".join(f"`{g['metric']}` {g['reason']}" for g in failed))
    m = report.get("metrics") or {}
    lines = [title, "", verdict, "",
             f"Source: `{report.get('source_model')}` · group size {report.get('group_size')} · "
             f"backend {report.get('backend')}", "",
             "| | before | after | change |", "|---|---:|---:|---:|",
             f"| size on disk | {_size(m.get('size_before_bytes'))} | {_size(m.get('size_after_bytes'))} | "
             f"×{m.get('size_ratio')} |",
             f"| perplexity ({m.get('perplexity_measured_on') or str(m.get('perplexity_rows')) + ' rows'}) | "
             f"{m.get('perplexity_before')} | "
             f"{m.get('perplexity_after')} | {m.get('perplexity_increase_pct'):+.2f}% |"
             if m.get("perplexity_increase_pct") is not None else "| perplexity | — | — | — |",
             "", "| gate | rule | value | |", "|---|---|---:|:-:|"]
    for g in gates:
        value = g.get("value")
        shown = "—" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append(f"| `{g['metric']}` | {g['rule']}{'' if g['passed'] else ' — ' + g['reason']} | {shown} | "
                     f"{'✅' if g['passed'] else '❌'} |")
    ev = report.get("eval")
    if ev:
        lines += ["", f"Eval gates re-run on the quantized model (baseline: "
                      f"{'the unquantized model' if ev.get('baseline', {}).get('kind') == 'report' else ev.get('baseline', {}).get('kind')}):"]
        for task, metrics in (ev.get("metrics") or {}).items():
            for name, mm in metrics.items():
                delta = "" if mm.get("delta") is None else f" (Δ {mm['delta']:+.4f})"
                lines.append(f"- `{task}/{name}`: {mm.get('value')}{delta}")
    lines += ["", f"Quantized in {m.get('quantize_seconds')} s; stage took {m.get('wall_seconds')} s."]
    return "\n".join(lines) + "\n"
