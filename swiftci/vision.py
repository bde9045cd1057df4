"""Vision-language models in the train stage: how swiftci tells one from a text model, loads it with its processor,
turns rows with images into model inputs (loss only on assistant tokens), batches them, and chooses which modules
learn.

A model is vision-language when its config.json has a `vision_config` (Llava, Qwen2-VL, InternVL, Idefics, Gemma 3
…): it loads through transformers' AutoModelForImageTextToText and AutoProcessor, so the model's own chat template
and image processing are used, never a copy of ours. Rows are those of data.py (`messages` with image parts, or
`images` + `<image>` placeholders).

What learns (`train.freeze_vision`, default true): the language model gets LoRA adapters on `train.lora
.target_modules` (`all-linear`: every Linear layer of the language model); the vision tower stays frozen with no
adapters; the projector between them trains fully (it is small, and is what maps the tower's features into the
language model). `freeze_vision: false` lets the target modules inside the tower get adapters too (tuner full:
trains it). A module name in `target_modules` that names the projector puts adapters there instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swiftci import data as datalib
from swiftci.errors import StageError, UsageError

# Where vision-language architectures keep their parts (module path components), across the families transformers
# ships: Llava/InternVL/Gemma3 (vision_tower, multi_modal_projector), Qwen2-VL/2.5-VL (visual, visual.merger),
# Idefics3/SmolVLM (vision_model, connector).
VISION_PARTS = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder")
PROJECTOR_PARTS = ("multi_modal_projector", "mm_projector", "connector", "merger")
TEXT_KEYS = ("input_ids", "attention_mask", "labels")


def is_vision_language(model_id: str, revision: str | None, local: Path | None) -> bool:
    """From config.json alone (for a hub id, only that file is fetched)."""
    if local is not None:
        config = json.loads((local / "config.json").read_text())
    else:
        from huggingface_hub import hf_hub_download

        try:
            config = json.loads(Path(hf_hub_download(model_id, "config.json", revision=revision)).read_text())
        except Exception as e:  # noqa: BLE001 - any hub failure: the loader reports it with its own message
            raise StageError(f"cannot read config.json of {model_id}: {type(e).__name__}: {e}") from None
    return "vision_config" in config


def load_processor(model_id: str, revision: str | None, local: Path | None) -> Any:
    from transformers import AutoProcessor

    from swiftci import models

    src, kwargs = models.source_kwargs(model_id, revision, local)
    with models.offline_if_local(local is not None):
        try:
            processor = AutoProcessor.from_pretrained(src, **kwargs)
        except OSError as e:
            raise StageError(f"cannot load the processor of {model_id}: {e}") from None
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_model(model_id: str, revision: str | None, local: Path | None, *, dtype: Any = None, **extra: Any) -> Any:
    from transformers import AutoModelForImageTextToText

    from swiftci import models

    src, kwargs = models.source_kwargs(model_id, revision, local)
    with models.offline_if_local(local is not None):
        try:
            return AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, **kwargs, **extra)
        except (OSError, ValueError) as e:
            raise StageError(f"cannot load vision-language model {model_id}: {e}") from None


# --- rows → inputs -----------------------------------------------------------------------------------------------


def tokenize(conversations: list[list[dict]], processor: Any, max_length: int,
             source: str) -> tuple[list[dict], int]:
    """Token ids, labels (-100 outside assistant turns) and the processor's image tensors for every row.

    The processor expands each image placeholder into the image's tokens; labels are computed on the text before
    that expansion (with the tokenizer's offsets) and the expanded image tokens get -100. A row longer than
    `max_length` is cut after its last image token, or dropped when the cut would split an image.
    Returns the examples and how many rows were dropped.
    """
    from PIL import Image

    tokenizer = processor.tokenizer
    image_token_id = _image_token_id(processor)
    examples, dropped = [], 0
    for n, msgs in enumerate(conversations):
        text = processor.apply_chat_template(msgs, tokenize=False)
        spans = datalib.assistant_spans(processor, msgs, text, f"{source}: row {n + 1}")
        plain = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        images = [Image.open(p).convert("RGB") for p in datalib.images_of(msgs)]
        enc = processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        labels = _expanded_labels(plain, spans, ids, image_token_id, f"{source}: row {n + 1}")
        if len(ids) > max_length:
            if image_token_id in ids[max_length:]:
                dropped += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == -100 for x in labels):
            dropped += 1
            continue
        vision = {k: v for k, v in enc.items() if k not in TEXT_KEYS and hasattr(v, "shape")}
        examples.append({"input_ids": ids, "labels": labels, "vision": vision})
    return examples, dropped


def _image_token_id(processor: Any) -> int:
    token = getattr(processor, "image_token", None) or datalib.IMAGE_PLACEHOLDER
    token_id = processor.tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == processor.tokenizer.unk_token_id:
        raise UsageError(f"the model's processor names no image token the tokenizer knows ({token!r})")
    return token_id


def _expanded_labels(plain: Any, spans: list[tuple[int, int]], ids: list[int], image_token_id: int,
                     where: str) -> list[int]:
    """Walk the unexpanded tokens and the processor's expanded ids side by side."""
    labels, j = [], 0
    for tok_id, (start, end) in zip(plain["input_ids"], plain["offset_mapping"]):
        if tok_id == image_token_id:
            run = 0
            while j < len(ids) and ids[j] == image_token_id:
                labels.append(-100)
                j += 1
                run += 1
            if run == 0:
                raise StageError(f"{where}: the processor did not expand an image token where the text has one")
            continue
        if j >= len(ids) or ids[j] != tok_id:
            raise StageError(f"{where}: the processor's tokens differ from the tokenizer's beyond the image tokens; "
                             "this model's processor is not supported for training yet")
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(tok_id if inside else -100)
        j += 1
    if j != len(ids):
        raise StageError(f"{where}: the processor produced tokens the text does not have")
    return labels


@dataclass
class Collator:
    """Pads text like data.PadCollator and concatenates the rows' image tensors (pixel_values, image sizes, grids)
    in row order, as the vision-language models expect them."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        out = datalib.PadCollator(self.pad_token_id)(batch)
        keys = {k for x in batch for k in x.get("vision", {})}
        for key in sorted(keys):
            out[key] = torch.cat([x["vision"][key] for x in batch if key in x.get("vision", {})])
        return out


# --- what learns -------------------------------------------------------------------------------------------------


def _part_of(name: str, parts: tuple[str, ...]) -> bool:
    return any(p in name.split(".") for p in parts)


def adapter_settings(model: Any, target_modules: str | list[str], freeze_vision: bool) -> dict:
    """LoraConfig arguments: the Linear layers that get adapters (full names), and the projector's modules, which
    train fully. Raises UsageError when the targets match nothing outside a frozen tower."""
    import torch

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if target_modules == "all-linear":
        chosen = [n for n in linear if not n.endswith("lm_head") and not _part_of(n, PROJECTOR_PARTS)]
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        chosen = [n for n in linear if n.split(".")[-1] in wanted or n in wanted
                  or any(w in n.split(".") for w in wanted)]
    if freeze_vision:
        chosen = [n for n in chosen if not _part_of(n, VISION_PARTS)]
    if not chosen:
        raise UsageError(f"train.lora.target_modules: {target_modules!r} matches no Linear layer of the language "
                         "model" + (" (the vision tower is frozen: train.freeze_vision)" if freeze_vision else ""))
    adapted_projector = any(_part_of(n, PROJECTOR_PARTS) for n in chosen)
    projector = sorted({_top(n, PROJECTOR_PARTS) for n, _ in model.named_modules() if _part_of(n, PROJECTOR_PARTS)})
    return {"target_modules": chosen,
            "modules_to_save": None if adapted_projector or not projector else [projector[0].split(".")[-1]]}


def _top(name: str, parts: tuple[str, ...]) -> str:
    pieces = name.split(".")
    for i, piece in enumerate(pieces):
        if piece in parts:
            return ".".join(pieces[: i + 1])
    return name


def freeze_tower(model: Any) -> int:
    """Full fine-tuning with train.freeze_vision: the tower's weights stop learning. Returns how many were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if _part_of(name, VISION_PARTS):
            param.requires_grad = False
            frozen += param.numel()
    return frozen
