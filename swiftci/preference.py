"""Preference tuning — DPO, KTO, ORPO, SimPO — through trl's own trainers, on rows in trl's own shapes. The train
stage (train.py) loads the model, adds the adapters, saves and reports as for sft; this module reads the rows and
builds the trainer.

Rows (`data.format: preference`, or `auto` from the first row), as trl takes them:
- pairs: {prompt, chosen, rejected}, strings (standard) or lists of messages (conversational: `prompt` is the
  conversation so far, `chosen`/`rejected` the assistant's answer) — for dpo, orpo, simpo, and kto (each pair
  becomes a desirable and an undesirable example);
- unpaired: {prompt, completion, label} with a boolean label — for kto.
Every bad row is listed with its line number before anything loads (exit 2).

Tested with trl 1.16: ORPO and SimPO (the CPO trainer with loss_type simpo) live in `trl.experimental` there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from swiftci import data as datalib
from swiftci.errors import UsageError

if TYPE_CHECKING:
    from swiftci.config import Config

PAIRED, UNPAIRED = ("prompt", "chosen", "rejected"), ("prompt", "completion", "label")
# what trl logs for a preference step, kept in loss.jsonl and the report (slashes become underscores)
LOGGED = ("rewards/", "logps/", "log_odds_", "nll_loss")
LOGGED_KEYS = tuple(k.replace("/", "_") for k in LOGGED)  # as loss.jsonl and the report name them


# --- rows ------------------------------------------------------------------------------------------------------


def row_problems(row: dict, method: str) -> list[str]:
    """What is wrong with one row for `method` (empty: nothing)."""
    shape = PAIRED if set(PAIRED) <= row.keys() else UNPAIRED if set(UNPAIRED) <= row.keys() else None
    if shape is None:
        missing = [k for k in PAIRED if k not in row] if "chosen" in row or "rejected" in row else \
            [k for k in UNPAIRED if k not in row]
        return [f"missing {', '.join(f'`{k}`' for k in missing)}"]
    if shape == UNPAIRED and method != "kto":
        return [f"{{prompt, completion, label}} rows are for kto; {method} needs {{prompt, chosen, rejected}}"]
    problems = [f"`{k}` is empty" for k in shape if k != "label" and not _text(row[k]).strip()]
    if shape == UNPAIRED and not isinstance(row["label"], bool):
        problems.append(f"`label` must be true or false, not {row['label']!r}")
    if shape == PAIRED and not problems and _text(row["chosen"]) == _text(row["rejected"]):
        problems.append("`chosen` equals `rejected`: nothing to prefer")
    for k in shape:
        if isinstance(row[k], list) and not all(isinstance(m, dict) and m.get("role") in datalib.ROLES
                                                 and isinstance(m.get("content"), str) for m in row[k]):
            problems.append(f"`{k}` must be a string or a list of {{role, content}} messages")
    return problems


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def load_rows(path: Path, method: str) -> list[dict]:
    """The rows of one file, ready for trl (kto: pairs unpaired); UsageError listing every bad row (up to 20)."""
    rows = datalib.read_jsonl(path)
    problems = [f"{path.name}: row {i + 1}: {p}" for i, r in enumerate(rows) for p in row_problems(r, method)]
    if problems:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise UsageError(f"bad preference rows in {path} for {method}:\n" + "\n".join(shown))
    rows = [{k: r[k] for k in (PAIRED if "chosen" in r else UNPAIRED)} for r in rows]
    if method == "kto" and rows and "chosen" in rows[0]:
        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for r in rows for k in ("chosen", "rejected")]
    return rows


def load(cfg: Config) -> tuple[list[dict], list[dict] | None, dict]:
    """(train rows, validation rows, their record for run.json)."""
    method = cfg.train.method
    record, loaded = {}, {}
    for field in ("train", "validation"):
        name = getattr(cfg.data, field)
        if name is None:
            continue
        path = cfg.resolve(name)
        loaded[field] = load_rows(path, method)
        record[field] = {"file": str(name), "sha256": datalib.sha256_file(path), "format": "preference",
                         "rows": len(datalib.read_jsonl(path)), "rows_used": len(loaded[field])}
    return loaded["train"], loaded.get("validation"), record


# --- the trainer -----------------------------------------------------------------------------------------------


def make_trainer(cfg: Config, model: Any, tokenizer: Any, rows: list[dict], validation: list[dict] | None,
                 settings: dict, callbacks: list) -> Any:
    """trl's trainer for the method, with the stage's settings (batch, schedule, precision, checkpoints)."""
    from datasets import Dataset

    from swiftci import models

    tc = cfg.train
    dtype = models.compute_dtype(tc.precision)[1]
    args = {**settings, "max_length": tc.max_length, "gradient_checkpointing": tc.gradient_checkpointing}
    common = {"model": model, "train_dataset": Dataset.from_list(rows), "processing_class": tokenizer,
              "callbacks": callbacks, "eval_dataset": Dataset.from_list(validation) if validation else None}
    if tc.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        d = tc.dpo
        return DPOTrainer(args=DPOConfig(**args, beta=d.beta, loss_type=d.loss_type if isinstance(d.loss_type, list) else [d.loss_type], label_smoothing=d.label_smoothing,
                                         precompute_ref_log_probs=d.precompute_ref_log_probs),
                          ref_model=_reference(cfg, d.reference, dtype), **common)
    if tc.method == "kto":
        from trl import KTOConfig, KTOTrainer

        k = tc.kto
        return KTOTrainer(args=KTOConfig(**args, beta=k.beta, desirable_weight=k.desirable_weight,
                                         undesirable_weight=k.undesirable_weight),
                          ref_model=_reference(cfg, k.reference, dtype), **common)
    if tc.method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(args=ORPOConfig(**args, beta=tc.orpo.beta), **common)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    sp = tc.simpo
    return CPOTrainer(args=CPOConfig(**args, loss_type="simpo", beta=sp.beta, simpo_gamma=sp.gamma,
                                     cpo_alpha=sp.cpo_alpha), **common)


def _reference(cfg: Config, reference: str, dtype: Any) -> Any:
    """None for `base` (the model the step starts from): with LoRA trl scores the reference on the same weights
    with the adapter disabled (one copy in memory); with full fine-tuning it keeps a frozen copy of the starting
    weights. Else that model: a folder, or a hub id (a chained step's `base`)."""
    if reference == "base":
        return None
    from swiftci import models

    path = cfg.resolve(reference)
    if (path / "config.json").is_file():
        return models.load_causal_lm(str(path), None, path, dtype=dtype)
    if "/" not in reference:
        raise UsageError(f"train.{cfg.train.method}.reference: {reference!r} is neither a model folder nor a hub "
                         "id; give `base`, a folder, or (in a train.then step) `sft`")
    return models.load_causal_lm(reference, None, None, dtype=dtype)


def logged(logs: dict) -> dict:
    """trl's preference figures from one log line, e.g. {"rewards_accuracies": 0.9, "rewards_margins": 1.2}."""
    return {k.replace("/", "_"): v for k, v in logs.items() if k.startswith(LOGGED) and isinstance(v, (int, float))}


def summary(metrics: dict) -> str | None:
    """One line for the report, the sticky comment and the finish message: reward accuracy and margin, held-out
    when there were held-out pairs, else at the last logging step."""
    for where, figures in (("held-out", metrics.get("validation_preference")), ("last step", metrics.get("preference"))):
        figures = figures or {}
        if "rewards_accuracies" in figures or "rewards_margins" in figures:
            parts = [f"reward accuracy {figures['rewards_accuracies']:.2f}" if "rewards_accuracies" in figures else "",
                     f"margin {figures['rewards_margins']:.3g}" if "rewards_margins" in figures else ""]
            return " · ".join(p for p in parts if p) + f" ({where})"
    return None
