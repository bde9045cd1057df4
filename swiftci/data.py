"""Training rows: read JSONL, detect the format, turn rows into chat messages, and tokenize them with the model's
chat template so that the loss falls only on assistant tokens.

Row formats (`data.format`):
- messages:   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}; for vision-language
              models a content may be a list of parts, `{"type": "image", "image": "path"}` and
              `{"type": "text", "text": "..."}`, or the row may carry `"images": ["path", ...]` whose entries fill the
              `<image>` placeholders of its contents in order (the ms-swift / LLaMA-Factory form). Image paths are
              relative to the data file; a missing or unreadable image makes the row bad.
- alpaca:     {"instruction": "...", "input": "...", "output": "...", "system"?: "..."}
- preference: trl's shapes, which preference.py trains on; as conversations (quantize's calibration and perplexity
              rows), the prompt and the preferred answer
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from swiftci.errors import UsageError

ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    problems = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path.name}:{n}: not valid JSON ({e.msg}); each line must be one JSON object")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path.name}:{n}: expected a JSON object, got {type(row).__name__}")
                continue
            rows.append(row)
        if len(problems) > 10:
            problems = problems[:10] + [f"… and {len(problems) - 10} more bad lines"]
    if problems:
        raise UsageError("bad rows in data file:\n" + "\n".join(problems))
    if not rows:
        raise UsageError(f"{path.name}: no rows; the data file is empty")
    return rows


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_format(rows: list[dict], declared: str, source: str) -> str:
    if declared != "auto":
        return declared
    first = rows[0]
    if "messages" in first:
        return "messages"
    if {"prompt", "chosen", "rejected"} <= first.keys() or {"prompt", "completion", "label"} <= first.keys():
        return "preference"
    if {"instruction", "output"} <= first.keys():
        return "alpaca"
    raise UsageError(
        f"{source}: cannot tell the row format from the first row (keys: {', '.join(sorted(first)) or 'none'}); "
        "use `messages` or `instruction`/`output` (alpaca) rows, or set data.format"
    )


def to_messages(row: dict, fmt: str, where: str, base: Path | None = None) -> list[dict]:
    """One row as chat messages; raises UsageError naming the row and the missing field. Image paths are resolved
    against `base` (the data file's folder)."""
    if fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise UsageError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), (str, list)):
                raise UsageError(f"{where}: messages[{i}] must be {{role: system|user|assistant, content: str}} "
                                 "(or, for images, content: a list of image and text parts)")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UsageError(f"{where}: no assistant message, so there is nothing to learn from this row")
        if "images" in row or any(isinstance(m["content"], list) for m in msgs):
            return _with_images(msgs, row.get("images"), where, base)
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if fmt == "alpaca":
        bad = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if bad:
            what = " and ".join(f"`{k}`" + (" (missing)" if k not in row else f" (a {type(row[k]).__name__})")
                                for k in bad)
            raise UsageError(f"{where}: alpaca rows need string `instruction` and `output`; this one has no string "
                             f"{what}")
        prompt = row["instruction"]
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if fmt == "preference":  # the preferred answer as a conversation: what quantize calibrates and scores on
        answer = row.get("chosen") if "chosen" in row else row.get("completion")
        if "chosen" not in row and row.get("label") is not True:
            answer = None
        prompt = row.get("prompt")
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt or "")}]
        reply = answer if isinstance(answer, list) else [{"role": "assistant", "content": str(answer or "")}]
        if answer is None:
            raise UsageError(f"{where}: an undesirable (label false) example has no preferred answer")
        return to_messages({"messages": [*msgs, *reply]}, "messages", where)
    raise UsageError(f"{where}: unknown data format {fmt!r}")


def _with_images(msgs: list[dict], images: Any, where: str, base: Path | None) -> list[dict]:
    """Messages whose contents are lists of parts, each image part holding its resolved path."""
    if images is not None and (not isinstance(images, list) or not all(isinstance(x, str) for x in images)):
        raise UsageError(f"{where}: `images` must be a list of image paths")
    queue = list(images or [])
    out = []
    for i, m in enumerate(msgs):
        content = m["content"]
        if isinstance(content, str):
            pieces = content.split(IMAGE_PLACEHOLDER)
            parts: list[dict] = []
            for k, piece in enumerate(pieces):
                if k:
                    if not queue:
                        raise UsageError(f"{where}: more {IMAGE_PLACEHOLDER} placeholders than `images` entries "
                                         f"({len(images or [])})")
                    parts.append({"type": "image", "image": queue.pop(0)})
                if piece:
                    parts.append({"type": "text", "text": piece})
            content = parts
        else:
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    continue
                if kind == "image" and isinstance(part.get("image"), str) and part["image"]:
                    continue
                raise UsageError(f"{where}: messages[{i}].content[{j}] must be {{type: text, text: str}} or "
                                 "{type: image, image: path}")
        out.append({"role": m["role"], "content": [
            {"type": "image", "image": str((base or Path()) / p["image"])} if p["type"] == "image" else dict(p)
            for p in content]})
    if queue:
        raise UsageError(f"{where}: {len(queue)} `images` entries have no {IMAGE_PLACEHOLDER} placeholder to fill")
    return out


def images_of(msgs: list[dict]) -> list[str]:
    """The image paths of one conversation, in order."""
    return [p["image"] for m in msgs if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]


def _image_problem(path: str) -> str | None:
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        return "not found"
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        return f"unreadable ({type(e).__name__}: {str(e)[:80]})"
    return None


def _line_numbers(path: Path) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def load_conversations(path: Path, declared_format: str) -> tuple[list[list[dict]], str]:
    """Every row as chat messages, and the format; raises UsageError listing every bad row (up to 20), images
    included (each must exist and open as an image)."""
    rows = read_jsonl(path)
    lines = _line_numbers(path)
    fmt = detect_format(rows, declared_format, path.name)
    if fmt == "preference":  # undesirable examples are no conversation to learn or calibrate on
        lines = [n for r, n in zip(rows, lines) if r.get("label") is not False]
        rows = [r for r in rows if r.get("label") is not False]
    conversations, problems = [], []
    for i, r in enumerate(rows):
        try:
            msgs = to_messages(r, fmt, f"{path.name}: row {i + 1}", base=path.parent)
        except UsageError as e:
            problems.append(str(e))
            continue
        for image in images_of(msgs):
            if problem := _image_problem(image):
                shown = Path(image).relative_to(path.parent) if Path(image).is_relative_to(path.parent) else image
                problems.append(f"{path.name}:{lines[i]}: row {i + 1}: image {str(shown)!r} {problem}; fix the "
                                "path (relative to the data file) or drop the row")
        conversations.append(msgs)
    if problems:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more bad rows"] if len(problems) > 20 else [])
        raise UsageError(f"{len(problems)} of {len(rows)} rows in {path} are not {fmt} rows:\n" + "\n".join(shown))
    return conversations, fmt


def sft_conversations(path: Path, declared_format: str) -> tuple[list[list[dict]], str]:
    """load_conversations for supervised fine-tuning, which preference rows are not for."""
    conversations, fmt = load_conversations(path, declared_format)
    if fmt == "preference":
        raise UsageError(f"{path.name}: preference rows (prompt/chosen/rejected or prompt/completion/label) need a "
                         "preference method: set train.method to dpo, kto, orpo or simpo, or give sft `messages` "
                         "or alpaca rows")
    return conversations, fmt


def assistant_spans(tokenizer: Any, msgs: list[dict], text: str, where: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns (content and end-of-turn marker) inside the rendered chat."""
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise UsageError(
                f"{where}: the model's chat template renders earlier turns differently once later turns are added, "
                "so assistant tokens cannot be located; use a model whose template is prefix-stable"
            )
        spans.append((len(before), len(through)))
    return spans


def tokenize_sft(conversations: list[list[dict]], tokenizer: Any, max_length: int, source: str) -> tuple[list[dict], int]:
    """Token ids and labels (-100 outside assistant turns), truncated at max_length.

    Returns the examples and how many rows were dropped because truncation left no assistant token.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "the base model's tokenizer has no chat template; use an instruct/chat model, or add a "
            "`chat_template.jinja` to a local copy of the model"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("the base model has no fast tokenizer (tokenizer.json); swiftci needs token offsets to "
                         "train only on assistant tokens")
    examples = []
    dropped = 0
    for n, msgs in enumerate(conversations):
        where = f"{source}: row {n + 1}"
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        spans = assistant_spans(tokenizer, msgs, text, where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                        max_length=max_length)
        labels = []
        for tok_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            inside = any(s <= start < e for s, e in spans) and end > start
            labels.append(tok_id if inside else -100)
        if all(x == -100 for x in labels):
            dropped += 1
            continue
        examples.append({"input_ids": enc["input_ids"], "labels": labels})
    return examples, dropped


class PadCollator:
    """Pads a batch to its longest row: input ids with the pad token, labels with -100."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            n = len(x["input_ids"])
            ids[i, :n] = torch.tensor(x["input_ids"])
            labels[i, :n] = torch.tensor(x["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class LabelledLogits:
    """Wraps a collator so the model computes its logits only where a label is: `logits_to_keep`, a boolean mask of
    the positions whose next token is learned, and `shift_labels`, those positions' labels, which transformers'
    causal-LM loss takes as they are. Every other position's label is -100 and adds nothing to the loss, so the
    loss and its gradients are those of the full logits, without the lm_head and the softmax over the vocabulary
    for the prompt, the padding and the image tokens."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        out = self.collate(batch)
        shifted = torch.nn.functional.pad(out["labels"], (0, 1), value=-100)[..., 1:]  # position t learns t + 1
        keep = shifted != -100
        out["logits_to_keep"], out["shift_labels"] = keep, shifted[keep]
        return out
