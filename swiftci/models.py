"""Loading base models, tokenizers and adapters, shared by the stages that need weights (train, evaluate, quantize).

A local model folder is loaded with `local_files_only=True` and HF_HUB_OFFLINE set, so no hub call can delay or
break a run on a local path. Hub models are loaded at `model.revision`, and the commit actually used is recorded.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from swiftci.errors import StageError

ADAPTER_CONFIG = "adapter_config.json"
# Files that hold weights: an image puts them in their own layers, quantize compares their sizes.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def compute_dtype(precision: str = "auto") -> tuple[str, Any]:
    """(name, torch dtype) for `train.precision`-style settings. `auto`, the one policy every stage follows:
    bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPU."""
    import torch

    if precision == "auto":
        if torch.cuda.is_available():
            return ("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else ("fp16", torch.float16)
        return "fp32", torch.float32
    return precision, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def weights_bytes(model_dir: Path) -> int:
    """Bytes of a model folder's weight files."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


@contextmanager
def offline_if_local(local: bool):
    """Keep the hub out of runs on local folders (transformers and huggingface_hub read this at call time)."""
    if not local:
        yield
        return
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def source_kwargs(model_id: str, revision: str | None, local_path: Path | None) -> tuple[str, dict]:
    if local_path is not None:
        return str(local_path), {"local_files_only": True}
    return model_id, {"revision": revision} if revision else {}


def load_tokenizer(model_id: str, revision: str | None, local_path: Path | None):
    from transformers import AutoTokenizer

    src, kwargs = source_kwargs(model_id, revision, local_path)
    with offline_if_local(local_path is not None):
        try:
            tok = AutoTokenizer.from_pretrained(src, **kwargs)
        except OSError as e:
            raise StageError(f"cannot load the tokenizer of {model_id}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model_id: str, revision: str | None, local_path: Path | None, *, dtype: Any = None,
                   **extra: Any):
    from transformers import AutoModelForCausalLM

    src, kwargs = source_kwargs(model_id, revision, local_path)
    with offline_if_local(local_path is not None):
        try:
            return AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs, **extra)
        except OSError as e:
            raise StageError(f"cannot load model {model_id}: {e}") from None


def resolved_revision(model_id: str, revision: str | None, model: Any) -> str | None:
    """The hub commit that from_pretrained actually used (None for local folders)."""
    sha = getattr(model.config, "_commit_hash", None)
    if sha:
        return sha
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - best effort: the record then says "unknown"
        return None
    if isinstance(cached, str) and "/snapshots/" in cached:
        return cached.split("/snapshots/")[1].split("/")[0]
    return None


def folder_sha256(path: Path) -> str:
    """Content hash of a local model folder: every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def merge_adapter(base_model: Any, adapter_dir: Path, out_dir: Path, tokenizer: Any) -> None:
    """Apply a LoRA adapter to a freshly loaded (unquantized) base model, merge it and save the result."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
