"""The evaluate stage: score a model with lm-evaluation-harness (`simple_evaluate`), compare it with a baseline, and
apply the quality gates. Fails closed: a crash, an unknown task, a missing or NaN metric or zero samples never
passes.

Outputs in `<output_dir>/evaluate/`:
  eval_report.json     {"version": 2, "stage": "evaluate", "status", "metrics": {task: {metric: {value, stderr,
                       baseline, delta}}}, "gates": [{metric, rule, value, passed, reason}], "passed"}
  eval_report.md       one table a reviewer reads: metric | baseline | candidate | Δ (± stderr) | gate | ✅/❌
  lm_eval/             lm-eval's own results JSON for the candidate and the baseline

With `baseline: base` and a LoRA adapter, the base weights are loaded once: the baseline is the same model with the
adapter disabled, so no second model load and no second lm-eval process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swiftci import models, preflight, provenance, quiet, reports, stages, vision
from swiftci.config import Config, EvaluateConfig, GateConfig
from swiftci.errors import ConfigError, GateFailed, StageError, SwiftCIError, UsageError
from swiftci.notify import Redactor

STAGE = "evaluate"
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics; mean metrics (accuracy, exact match) use the exact formula


@dataclass
class Candidate:
    """What is evaluated: a LoRA adapter on the config's base model, or a standalone model folder (or hub id)."""

    label: str  # as shown in reports (the base URL for an endpoint)
    kind: str  # "adapter" | "model" | "base" | "endpoint"
    path: Path | None  # adapter or model folder; None for the config's base model itself and endpoints
    run_id: str | None
    label_model: str = ""  # the served model name, for an endpoint
    sha256: str | None = None  # the digest of the files evaluated (None: the config's base model, an endpoint)
    verified: dict[str, str] | None = None  # {stage: files_sha256} of the records its files were checked against


@dataclass
class Scores:
    """One model scored on every task: lm-eval's merged results and the seconds each task took."""

    raw: dict
    seconds: dict[str, float]
    samples: dict[str, list[dict]] = field(default_factory=dict)  # lm-eval's per-sample records, by task


@dataclass
class Evaluation:
    """The candidate's scores and, when the baseline is a model, the baseline's; how many models were loaded."""

    candidate: Scores
    baseline: Scores | None
    model_loads: int


def run(cfg: Config, *, model_dir: Path | None = None, baseline: str | None = None,
        out_dir: Path | None = None, endpoint: tuple[str, str] | None = None) -> dict:
    """Evaluate and gate; reports go to `out_dir` (default `<output_dir>/evaluate`). Raises GateFailed (exit 1),
    whose `details` is the report.

    `endpoint=(base_url, model name)` scores a served model through its OpenAI-compatible chat API instead of
    loading weights (a canary); only generation tasks can be scored that way, the others fail closed."""
    ev = cfg.evaluate
    if ev is None:
        raise UsageError(f"{cfg.source}: no `evaluate` section; add one with `tasks:` (see examples/tiny/swiftci.yaml)")
    field = "--baseline" if baseline is not None else "evaluate.baseline"
    baseline = baseline if baseline is not None else ev.baseline
    drops = _check_baseline(cfg, baseline, field)
    candidate = _candidate(cfg, model_dir, endpoint)
    if candidate.kind == "endpoint" and baseline == "base":
        baseline = "none"  # no weights to disable an adapter on; compare with an eval report instead
    if drops and baseline == "base" and candidate.kind == "base":
        raise UsageError(f"{field}: {', '.join(drops)} set max_drop against `base`, but the model evaluated here IS "
                         "the base model (no train section, no --model), so it would be compared with itself; give "
                         "an earlier eval_report.json as the baseline, or gate with `min`")
    out = out_dir or cfg.stage_dir(STAGE)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    head = reports.new_report(STAGE, stages.RUNNING, run_id=candidate.run_id,
                              model={"path": candidate.label, "kind": candidate.kind, "sha256": candidate.sha256},
                              verified=candidate.verified,
                              fingerprint=stages.fingerprint(cfg, STAGE) if candidate.verified else None,
                              baseline={"kind": _baseline_kind(baseline), "source": _baseline_label(baseline)},
                              inputs=provenance.stage_inputs(cfg, STAGE))  # the task files it read
    _write(out, {**head, "passed": False})
    try:
        evaluation = _evaluate(cfg, candidate, baseline, out)
    except (ConfigError, UsageError) as e:
        _write(out, _error_report(head, ev.gates, e, f"bad configuration: {e}", started))
        raise
    except Exception as e:  # fail closed: whatever broke, the gate is not passed
        error = e if isinstance(e, SwiftCIError) else StageError(f"{type(e).__name__}: {e}")
        _write(out, _error_report(head, ev.gates, error, str(error), started))
        raise StageError(f"evaluation could not run: {error}", kind=error.kind) from e
    report = _gated_report(cfg, head, evaluation, baseline, started)
    missing = [(i, g) for i, g in enumerate(report["gates"]) if g.get("missing")]
    if missing:  # a gate on a metric its task does not produce is a config mistake, never a worse model
        error = ConfigError([f"{cfg.source}: evaluate.gates[{i}].metric: '{g['metric']}' is not among the results: "
                             f"{g['reason']}" for i, g in missing])
        _write(out, _error_report(head, ev.gates, error, f"bad configuration: {error}", started))
        raise error
    _write(out, report)
    if not report["passed"]:
        failed = [g for g in report["gates"] if not g["passed"]]
        raise GateFailed("quality gate failed: " + "; ".join(f"{g['metric']} {g['reason']}" for g in failed)
                         + f" (report: {out / stages.EVALUATE.markdown})", details=report)
    return report


def _gated_report(cfg: Config, head: dict, evaluation: Evaluation, baseline: str, started: float) -> dict:
    ev = cfg.evaluate
    candidate = _metrics_from_raw(evaluation.candidate.raw)
    if baseline not in ("base", "none"):
        base_metrics = _metrics_from_report(reports.read_json(cfg.resolve(baseline)))
    else:
        base_metrics = _metrics_from_raw(evaluation.baseline.raw) if evaluation.baseline else {}
    tasks = {t: {"samples": _samples(evaluation.candidate.raw, t), "seconds": evaluation.candidate.seconds.get(t)}
             for t in ev.tasks}
    if evaluation.baseline is not None:
        for t in ev.tasks:
            tasks[t]["baseline_seconds"] = evaluation.baseline.seconds.get(t)
    metrics = _combine(candidate, base_metrics)
    gates = [_check_gate(g, metrics, tasks) for g in ev.gates]
    passed = all(g["passed"] for g in gates)
    redact = Redactor(list(cfg.env_values))
    worst = {g.metric: _lowest_scoring(evaluation.candidate.samples.get(g.task) or [], g, metrics, redact)
             for g, result in zip(ev.gates, gates) if not result["passed"]}
    return {**head, "status": "passed" if passed else "failed", "passed": passed, "tasks": tasks,
            "model_loads": evaluation.model_loads, "metrics": metrics, "gates": gates,
            "samples": {"folder": SAMPLES, "lowest_scoring": {k: v for k, v in worst.items() if v}},
            "wall_seconds": round(time.monotonic() - started, 2)}


# --- what the model answered --------------------------------------------------------------------------------------

SAMPLES = "samples"  # <stage folder>/samples/<candidate|baseline>/<task>.jsonl: lm-eval's per-sample records
SHOWN_SAMPLES = 3


def _save_samples(out: Path, label: str, samples: dict[str, list[dict]]) -> None:
    folder = out / SAMPLES / label
    folder.mkdir(parents=True, exist_ok=True)
    for task, rows in samples.items():
        text = "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows)
        reports.write_text(folder / f"{task}.jsonl", text)


def _lowest_scoring(samples: list[dict], gate: GateConfig, metrics: dict, redact: Any) -> list[dict]:
    """The first few samples with the worst value of the gate's metric (under its filter): what the prompt was,
    what was expected and what the model answered, redacted like notifications and cut to a readable length."""
    metric, _, filter_name = gate.metric_name.partition(",")
    higher = ((metrics.get(gate.task) or {}).get(gate.metric_name) or {}).get("higher_is_better", True)
    rows = [r for r in samples if isinstance(r.get(metric), (int, float)) and r.get("filter", "none") == (filter_name or "none")]
    rows.sort(key=lambda r: r[metric] if higher else -r[metric])  # stable: ties stay in document order
    return [{"doc_id": r.get("doc_id"), "score": r[metric], **{k: _short(redact(v)) for k, v in _view(r).items()}}
            for r in rows[:SHOWN_SAMPLES]]


def _view(sample: dict) -> dict[str, str]:
    """prompt, expected and got of one lm-eval sample: a generation's text, or a multiple-choice pick."""
    args = sample.get("arguments") or []
    prompt = args[0][0] if args and isinstance(args[0], (list, tuple)) and args[0] else ""
    resps, target = sample.get("filtered_resps") or [], sample.get("target")
    choices = [a[1] for a in args if isinstance(a, (list, tuple)) and len(a) > 1 and isinstance(a[1], str)]
    scored = [r[0] if isinstance(r, (list, tuple)) else r for r in resps]
    if choices and len(choices) == len(scored) and all(isinstance(x, (int, float)) for x in scored):
        got = choices[max(range(len(scored)), key=lambda i: scored[i])]
        expected = choices[target] if isinstance(target, int) and 0 <= target < len(choices) else target
    else:
        got = resps[0] if resps else ""
        expected = target
    return {"prompt": str(prompt), "expected": str(expected), "got": str(got)}


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


# --- what to evaluate -------------------------------------------------------------------------------------------


def _candidate(cfg: Config, model_dir: Path | None, endpoint: tuple[str, str] | None) -> Candidate:
    if endpoint is not None:
        return Candidate(endpoint[0], "endpoint", None, stages.train_run_id(cfg), label_model=endpoint[1])
    if model_dir is not None:
        path = Path(model_dir).resolve()
        if not path.is_dir():
            raise UsageError(f"--model: {model_dir} is not a folder")
        if not (models.is_adapter_dir(path) or (path / "config.json").is_file()):
            raise UsageError(f"--model: {model_dir} holds neither a model (config.json) nor an adapter "
                             f"({models.ADAPTER_CONFIG})")
        kind = "adapter" if models.is_adapter_dir(path) else "model"
        return Candidate(_label(cfg, path), kind, path, stages.train_run_id(cfg), sha256=stages.folder_digest(path))
    if cfg.train is None:
        return Candidate(cfg.model.id, "base", None, None)
    # the adapter when there is one: the baseline is then the same weights with it disabled
    trained = stages.produced(cfg, "train", prefer=("adapter", "model"))
    return Candidate(_label(cfg, trained.path), trained.kind, trained.path, trained.run_id, sha256=trained.sha256,
                     verified={"train": (stages.read_report(cfg, "train") or {}).get("files_sha256")})


def _check_baseline(cfg: Config, baseline: str, field: str) -> list[str]:
    """Whether the baseline can exist, before any model loads (exit 2); returns the gates that need one."""
    if baseline not in ("base", "none"):
        _check_baseline_report(cfg.resolve(baseline), field)
    drops = [f"evaluate.gates[{i}]" for i, g in enumerate(cfg.evaluate.gates) if g.max_drop is not None]
    if drops and baseline == "none":
        raise UsageError(f"{field}: {', '.join(drops)} set max_drop, which needs a baseline, but the baseline is "
                         "`none`; give `base` or an earlier eval_report.json, or gate with `min`")
    return drops


def _label(cfg: Config, path: Path) -> str:
    try:
        return str(path.relative_to(cfg.resolve(".").resolve()))
    except ValueError:
        return path.name


def _check_baseline_report(path: Path, field: str) -> None:
    """An earlier eval_report.json given as the baseline is read before any model loads: a wrong file must not
    cost an evaluation first and then fail every max_drop gate."""
    if not path.is_file():
        raise UsageError(f"{field}: {path} is not `base`, `none` or an existing eval_report.json")
    try:
        report = reports.read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{field}: {path} is not readable JSON ({e})") from None
    if not isinstance(report, dict) or report.get("stage") != "evaluate" or not isinstance(report.get("metrics"), dict):
        raise UsageError(f"{field}: {path} is not a swiftci eval_report.json (no evaluate stage metrics); give the "
                         "eval_report.json of an earlier `swiftci evaluate`")


def _baseline_kind(baseline: str) -> str:
    return baseline if baseline in ("base", "none") else "report"


def _baseline_label(baseline: str) -> str | None:
    return None if baseline == "none" else baseline


# --- running lm-eval --------------------------------------------------------------------------------------------


def _quiet() -> None:
    os.environ["TQDM_DISABLE"] = "1"  # lm-eval's per-request progress bars would drown the CI log
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|lm_eval)\.")
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_model(cfg: Config, candidate: Candidate, sees: bool = False):
    """(model, tokenizer) for the candidate; a LoRA adapter comes back as a PeftModel over the base. `sees`: a
    vision-language model, loaded with its processor in place of the tokenizer."""
    import torch

    local = cfg.model_local_path
    _, dtype = models.compute_dtype("auto")
    device_map = {"": 0} if torch.cuda.is_available() else None
    load_model = vision.load_model if sees else models.load_causal_lm
    load_tokenizer = vision.load_processor if sees else models.load_tokenizer
    if candidate.kind in ("adapter", "base"):
        model = load_model(cfg.model.id, cfg.model.revision, local, dtype=dtype, device_map=device_map)
        if candidate.kind == "adapter":
            from peft import PeftModel

            with models.offline_if_local(True):
                model = PeftModel.from_pretrained(model, str(candidate.path))
            tokenizer = load_tokenizer(str(candidate.path), None, candidate.path)
        else:
            tokenizer = load_tokenizer(cfg.model.id, cfg.model.revision, local)
    else:
        quantized = "quantization_config" in json.loads((candidate.path / "config.json").read_text())
        model = load_model(str(candidate.path), None, candidate.path,
                           dtype="auto" if quantized else dtype, device_map=device_map)
        tokenizer = load_tokenizer(str(candidate.path), None, candidate.path)
    model.eval()
    return model, tokenizer


def _harness_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's wrapper around a loaded model: `hf`, or `hf-multimodal` for a vision-language model (whose
    processor it loads from the model's folder: it does not take a processor object)."""
    if hasattr(tokenizer, "image_processor"):
        from lm_eval.models.hf_vlms import HFMultimodalLM

        return HFMultimodalLM(pretrained=model, batch_size=batch_size)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _evaluate(cfg: Config, candidate: Candidate, baseline: str, out: Path) -> Evaluation:
    """Run every task on the candidate, and on the baseline when it is a model."""
    quiet.import_libraries(out, (*quiet.NOISY, "lm_eval", "lm_eval.models.huggingface"))
    _quiet()
    ev = cfg.evaluate
    manager, problems = preflight.task_manager(cfg)
    if problems:
        raise ConfigError(problems)
    task_dir = cfg.resolve(ev.task_dir) if ev.task_dir else Path.cwd()
    # Build each task (and read its dataset) once, before any weights are loaded; both models reuse the objects.
    with contextlib.chdir(task_dir):
        built = {task: _build_task(manager, task) for task in ev.tasks}
    score = functools.partial(_score, ev, built, manager, task_dir, out)
    if candidate.kind == "endpoint":
        return Evaluation(score(_endpoint_lm(ev, candidate, built), "candidate", chat=True), None, model_loads=0)
    sees = vision.is_vision_language(cfg.model.id, cfg.model.revision, cfg.model_local_path)
    model, tokenizer = _load_model(cfg, candidate, sees)
    lm = _harness_lm(model, tokenizer, ev.batch_size)
    scores = score(lm, "candidate")
    if baseline != "base" or candidate.kind == "base":
        return Evaluation(scores, None, model_loads=1)
    if candidate.kind == "adapter":  # same weights in memory, adapter off: no second load
        with model.disable_adapter():
            return Evaluation(scores, score(lm, "baseline"), model_loads=1)
    del lm, model
    base_model, base_tokenizer = _load_model(cfg, Candidate(cfg.model.id, "base", None, None), sees)
    base_lm = _harness_lm(base_model, base_tokenizer, ev.batch_size)
    return Evaluation(scores, score(base_lm, "baseline"), model_loads=2)


def _score(ev: EvaluateConfig, built: dict, manager: Any, task_dir: Path, out: Path, lm: Any, label: str, *,
           chat: bool | None = None) -> Scores:
    """Every task on one model (or endpoint), with the evaluate section's settings; lm-eval's results are kept in
    `lm_eval/<label>.json`. `chat` overrides apply_chat_template (a chat endpoint always applies its own)."""
    from lm_eval import simple_evaluate

    chat = ev.apply_chat_template if chat is None else chat
    merged: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    samples: dict[str, list[dict]] = {}
    for task in ev.tasks:
        t0 = time.monotonic()
        # local YAMLs' paths are relative to task_dir; lm-eval's own bars and warnings go to libraries.log
        with contextlib.chdir(task_dir), _naming_task(task, label), quiet.captured(out / quiet.LIBRARIES_LOG):
            result = simple_evaluate(
                model=lm, tasks=built[task], task_manager=manager, limit=ev.limit, num_fewshot=ev.num_fewshot,
                batch_size=ev.batch_size, apply_chat_template=chat,
                fewshot_as_multiturn=chat and bool(ev.num_fewshot), log_samples=True,
                bootstrap_iters=BOOTSTRAP_ITERS)
        seconds[task] = round(time.monotonic() - t0, 2)
        samples.update(result.get("samples") or {})
        for key in ("results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
            merged.setdefault(key, {}).update(result.get(key) or {})
        for key in ("config", "lm_eval_version", "transformers_version", "date"):
            merged.setdefault(key, result.get(key))
    _save_lm_eval(out / "lm_eval" / f"{label}.json", merged)
    _save_samples(out, label, samples)
    return Scores(merged, seconds, samples)


def _build_task(manager: Any, task: str) -> list:
    """lm-eval Task/Group objects for one configured name (a tag expands to several tasks)."""
    try:
        loaded = manager.load([task])
    except StopIteration:  # the datasets JSON reader finds no first row in an empty file
        raise StageError(f"task '{task}' has 0 samples: its dataset is empty, so nothing can be scored") from None
    except Exception as e:  # lm-eval raises anything from a task's YAML: named, then raised
        raise StageError(f"lm-eval could not load task '{task}': {type(e).__name__}: {e}") from e
    if task in loaded["groups"]:
        return [loaded["groups"][task]]
    if task in loaded["tasks"]:
        return [loaded["tasks"][task]]
    return list(loaded["tasks"].values())


@contextlib.contextmanager
def _naming_task(task: str, label: str):
    """Say which task (and which model) an lm-eval failure came from."""
    try:
        yield
    except Exception as e:  # named, then raised
        detail = f"{type(e).__name__}: {e}".rstrip(": ")
        raise StageError(f"lm-eval failed on task '{task}' ({label}): {detail}") from e


def _endpoint_lm(ev: EvaluateConfig, candidate: Candidate, built: dict) -> Any:
    """lm-eval's local-chat-completions model for a served model's /v1/chat/completions. A chat endpoint gives no
    log-likelihoods (generation tasks only) and applies the server's chat template; `evaluate.batch_size` is the
    number of requests in flight (the server batches them)."""
    from lm_eval.models.openai_completions import LocalChatCompletion

    for task, objs in built.items():
        kinds = {t.get_config("output_type") for t in objs if hasattr(t, "get_config")}
        if kinds - {"generate_until"}:
            raise StageError(f"task '{task}' needs log-likelihoods ({', '.join(sorted(kinds))}), which a chat "
                             "endpoint cannot give; score only generation tasks through an endpoint "
                             "(deploy.canary.tasks)")
    return LocalChatCompletion(model=candidate.label_model, base_url=candidate.label.rstrip("/") + "/chat/completions",
                               tokenizer_backend=None, tokenized_requests=False, num_concurrent=ev.batch_size,
                               max_retries=2)


def _save_lm_eval(path: Path, results: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    reports.write_text(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")


def _samples(raw: dict, task: str) -> int | None:
    n = (raw.get("n-samples") or {}).get(task)
    return n.get("effective") if isinstance(n, dict) else None


# --- metrics and gates -----------------------------------------------------------------------------------------


def _number(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for unknown stderr


def _metrics_from_raw(raw: dict) -> dict[str, dict[str, dict]]:
    """lm-eval's {"results": {task: {"acc,none": v, "acc_stderr,none": s}}} -> {task: {"acc": {value, stderr}}}."""
    out: dict[str, dict[str, dict]] = {}
    hib = raw.get("higher_is_better") or {}
    for section in ("results", "groups"):
        for task, values in (raw.get(section) or {}).items():
            for key, value in values.items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                name = metric if filt == "none" else f"{metric},{filt}"
                out.setdefault(task, {})[name] = {
                    "value": _number(value),
                    "stderr": _number(values.get(f"{metric}_stderr,{filt}")),
                    "higher_is_better": (hib.get(task) or {}).get(metric, True),
                }
    return out


def _metrics_from_report(report: dict) -> dict[str, dict[str, dict]]:
    """An earlier eval_report.json as a baseline: its candidate values become our baseline values."""
    parsed: dict[str, dict[str, dict]] = {}
    for task, metrics in (report.get("metrics") or {}).items():
        for name, m in metrics.items():
            parsed.setdefault(task, {})[name] = {"value": m.get("value"), "stderr": m.get("stderr"),
                                                 "higher_is_better": m.get("higher_is_better", True)}
    return parsed


def _combine(candidate: dict, baseline: dict) -> dict:
    """Candidate and baseline metrics side by side, with the delta."""
    out: dict[str, dict[str, dict]] = {}
    for task, metrics in candidate.items():
        for name, m in metrics.items():
            b = (baseline.get(task) or {}).get(name) or {}
            bv, v = b.get("value"), m["value"]
            delta = v - bv if v is not None and bv is not None and math.isfinite(v) and math.isfinite(bv) else None
            out.setdefault(task, {})[name] = {"value": v, "stderr": m["stderr"], "baseline": bv,
                                              "baseline_stderr": b.get("stderr"), "delta": delta,
                                              "higher_is_better": m["higher_is_better"]}
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def describe_rule(gate: GateConfig) -> str:
    parts = []
    if gate.min is not None:
        parts.append(f"≥ {_fmt(gate.min)}")
    if gate.max is not None:
        parts.append(f"≤ {_fmt(gate.max)}")
    if gate.max_drop is not None:
        drop = gate.max_drop if isinstance(gate.max_drop, str) else _fmt(gate.max_drop)
        parts.append(f"drop ≤ {drop}" + (" + stderr" if gate.margin == "stderr" else ""))
    return ", ".join(parts)


def _check_gate(gate: GateConfig, metrics: dict, tasks: dict) -> dict:
    result = {"metric": gate.metric, "rule": describe_rule(gate), "value": None, "baseline": None, "passed": False,
              "reason": ""}
    m = (metrics.get(gate.task) or {}).get(gate.metric_name)
    samples = (tasks.get(gate.task) or {}).get("samples")
    if samples == 0:
        result["reason"] = "0 samples were evaluated"
        return result
    if m is None:
        produced = ", ".join(sorted(metrics.get(gate.task, {}))) or "nothing"
        result["reason"] = f"metric missing from the results (task produced: {produced})"
        result["missing"] = bool(metrics.get(gate.task))  # the task ran, without this metric
        return result
    value, baseline = m["value"], m["baseline"]
    result["value"], result["baseline"] = value, baseline
    if value is None or not math.isfinite(value):
        result["reason"] = f"value is {value!r}, not a number"
        return result
    failures = []
    if gate.min is not None and not value >= gate.min:
        failures.append(f"{_fmt(value)} < min {_fmt(gate.min)}")
    if gate.max is not None and not value <= gate.max:
        failures.append(f"{_fmt(value)} > max {_fmt(gate.max)}")
    if gate.max_drop is not None:
        if baseline is None or not math.isfinite(baseline):
            failures.append("no baseline value to compare with")
        else:
            allowed = gate.allowed_drop(baseline)
            if gate.margin == "stderr":
                allowed += math.hypot(m["stderr"] or 0.0, m["baseline_stderr"] or 0.0)
            drop = (baseline - value) if m["higher_is_better"] else (value - baseline)
            result["allowed_drop"] = allowed
            if drop > allowed + 1e-12:
                failures.append(f"dropped {_fmt(drop)} from {_fmt(baseline)} (allowed {_fmt(allowed)})")
    result["passed"] = not failures
    result["reason"] = "; ".join(failures) if failures else "ok"
    return result


def _error_report(head: dict, gates: list[GateConfig], error: SwiftCIError, reason: str, started: float) -> dict:
    return {**head, "status": "error", "passed": False, "error": stages.error(reason, error.kind, error.hint),
            "tasks": {}, "metrics": {},
            "gates": [{"metric": g.metric, "rule": describe_rule(g), "value": None, "baseline": None,
                       "passed": False, "reason": f"evaluation could not run: {reason}"} for g in gates],
            "wall_seconds": round(time.monotonic() - started, 2)}


def _write(out: Path, report: dict) -> None:
    reports.write_json(out / stages.EVALUATE.report, report)
    reports.write_text(out / stages.EVALUATE.markdown, render_markdown(report))


# --- the report people read -------------------------------------------------------------------------------------


def render_markdown(report: dict) -> str:
    gates = report.get("gates") or []
    failed = [g for g in gates if not g["passed"]]
    if report["status"] == "error":
        verdict = f"❌ **FAIL** — evaluation could not run: {stages.failure_reason(report)}"
    elif failed:
        verdict = f"❌ **FAIL** — {len(failed)} of {len(gates)} gates failed: " + "; ".join(
            f"`{g['metric']}` {g['reason']}" for g in failed)
    elif gates:
        verdict = f"✅ **PASS** — all {len(gates)} gates passed"
    else:
        verdict = "✅ **PASS** — no gates configured"
    lines = ["### swiftci evaluate", "", verdict, ""]
    model = report.get("model") or {}
    base = report.get("baseline") or {}
    base_text = {"base": "the base model", "none": "none"}.get(base.get("kind"), f"`{base.get('source')}`")
    lines.append(f"Model: `{model.get('path')}` ({model.get('kind')})"
                 + (f" · run `{report['run_id']}`" if report.get("run_id") else "") + f" · baseline: {base_text}")
    lines.append("")
    by_metric = {g["metric"]: g for g in gates}
    rows = []
    for task, metrics in (report.get("metrics") or {}).items():
        for name, m in metrics.items():
            key = f"{task}/{name}"
            g = by_metric.pop(key, None)
            rows.append(_row(key, m, g))
    for key, g in by_metric.items():  # gates whose metric never appeared (fail-closed rows)
        rows.append(_row(key, None, g))
    if rows:
        lines += ["| metric | baseline | candidate | Δ (± stderr) | gate | |", "|---|---:|---:|---:|---|:-:|", *rows]
    tasks = report.get("tasks") or {}
    if tasks:
        timing = []
        for task, t in tasks.items():
            part = f"{task} {t.get('seconds')} s"
            if t.get("baseline_seconds") is not None:
                part += f" (baseline {t['baseline_seconds']} s)"
            part += f", {t.get('samples')} samples"
            timing.append(part)
        lines += ["", "Time per task: " + "; ".join(timing) + "."]
    for metric, rows in ((report.get("samples") or {}).get("lowest_scoring") or {}).items():
        lines += ["", f"<details><summary>What the model answered: the lowest-scoring samples of <code>{_text(metric)}"
                      f"</code> (all in <code>{SAMPLES}/</code>)</summary>", "",
                  "| doc | prompt | expected | got | score |", "|---:|---|---|---|---:|"]
        lines += [f"| {r.get('doc_id')} | {_text(r['prompt'])} | {_text(r['expected'])} | {_text(r['got'])} | "
                  f"{_fmt(r.get('score'))} |" for r in rows]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def _text(value: Any) -> str:
    """Model and data text as an inert table cell: no Markdown table breaks, no HTML, newlines shown as ⏎."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
    return text.replace("\r\n", "⏎").replace("\n", "⏎").replace("`", "&#96;") or "∅"


def _row(key: str, m: dict | None, g: dict | None) -> str:
    if m is None:
        cells = ["—", "—", "—"]
    else:
        delta = "—"
        if m.get("delta") is not None:
            se = math.hypot(m.get("stderr") or 0.0, m.get("baseline_stderr") or 0.0)
            delta = f"{m['delta']:+.4f}" + (f" (± {se:.4f})" if m.get("stderr") is not None else "")
        cells = [_cell(m.get("baseline")), _cell(m.get("value")), delta]
    gate = g["rule"] if g else "—"
    mark = "" if g is None else ("✅" if g["passed"] else "❌")
    if g and not g["passed"]:
        gate += f" — {g['reason']}"
    return f"| `{key}` | " + " | ".join(cells) + f" | {gate} | {mark} |"


def _cell(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4f}" if math.isfinite(x) else str(x)
