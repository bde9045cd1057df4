"""What a run was made of, in one place: the environment record every run.json holds, the hashes of the files each
stage read, the data pins (`data.sha256`), and the comparison with an earlier run's record (`swiftci train --like`,
`reproduce:`) — all before anything loads. `swiftci diff` (swiftci/diff.py) lays two such records side by side.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swiftci import reports
from swiftci.data import sha256_file
from swiftci.errors import UsageError

if TYPE_CHECKING:
    from swiftci.config import Config

# The stack a result depends on; None in the record when a package is not installed.
PACKAGES = ("swiftci", "torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "bitsandbytes", "lm-eval",
            "gptqmodel", "tokenizers", "datasets", "huggingface_hub", "modelscope")


# --- the environment --------------------------------------------------------------------------------------------


def environment() -> dict:
    """Python; torch with its CUDA/cuDNN build and the driver; the packages; the GPU model and count."""
    import torch

    on_cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
                  "driver": _nvidia_driver() if on_cuda else None},
        "gpu": {"model": torch.cuda.get_device_name(0) if on_cuda else None,
                "count": torch.cuda.device_count() if on_cuda else 0},
        "packages": package_versions(),
    }


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


# --- the files a stage read -------------------------------------------------------------------------------------


def data_files(cfg: Config) -> dict[str, Path]:
    """The data files a training reads, keyed as the config writes them."""
    out: dict[str, Path] = {}
    for data in (cfg.data, cfg.train.then.data if cfg.train and cfg.train.then else None):
        if data is None:
            continue
        for path in (data.train, data.validation):
            if path is not None:
                out[str(path)] = cfg.resolve(path)
    return out


def stage_inputs(cfg: Config, stage: str) -> dict[str, str]:
    """sha256 of each file stage `stage` reads (train: data; evaluate: task files; quantize: calibration data)."""
    files: dict[str, Path] = {}
    if stage == "train":
        files = data_files(cfg)
    elif stage == "evaluate" and cfg.evaluate is not None and cfg.evaluate.task_dir:
        root = cfg.resolve(cfg.evaluate.task_dir)
        files = {f"{cfg.evaluate.task_dir}/{p.relative_to(root)}": p for p in sorted(root.rglob("*")) if p.is_file()}
    elif stage == "quantize" and cfg.quantize is not None:
        calibration = cfg.quantize.calibration.file or (cfg.data.train if cfg.data else None)
        files = {str(calibration): cfg.resolve(calibration)} if calibration is not None else {}
    return {name: sha256_file(path) for name, path in files.items() if path.is_file()}


def check_data_pins(cfg: Config) -> None:
    """`data.sha256`: every pinned file must still be those bytes (exit 2 before training, both hashes shown)."""
    problems = data_pin_problems(cfg)
    if problems:
        raise UsageError("\n".join(problems), kind="PinMismatch",
                         hint="the data is not the data the config pins: restore it, or review the change and "
                              "update data.sha256 (`sha256sum FILE`)")


def data_pin_problems(cfg: Config) -> list[str]:
    pinned = (cfg.data.sha256 if cfg.data else None) or {}
    problems = []
    for name, want in sorted(pinned.items()):
        path = cfg.resolve(name)
        if not path.is_file():
            problems.append(f"data.sha256: {name} is pinned but not found (resolved to {path})")
            continue
        got = sha256_file(path)
        if got != want:
            problems.append(f"data.sha256: {name} changed: pinned {want}, now {got}")
    return problems


# --- an earlier run's record ------------------------------------------------------------------------------------


def find_record(path: Path) -> Path:
    """A run.json, given itself or an output folder (`train/run.json`; a chained training's last step's)."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "run.json", path / "train" / "run.json"):
        if candidate.is_file():
            return candidate
    steps = sorted((path / "train").glob("*/run.json")) if (path / "train").is_dir() else []
    chained = [p for p in steps if reports.read_json(p).get("parent")]
    if chained or steps:
        return (chained or steps)[-1]
    raise UsageError(f"{path}: no run.json there (looked for {path}/run.json and {path}/train/run.json); pass a "
                     "run.json or an output folder")


def read_record(path: Path) -> dict:
    try:
        record = reports.read_json(find_record(path))
    except ValueError as e:
        raise UsageError(f"{path}: not a readable run.json: {e}") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path}: not a run.json (expected an object)")
    return record


@dataclass
class Difference:
    what: str  # e.g. environment.packages.transformers
    before: Any  # the earlier run's
    now: Any  # this run's

    def __str__(self) -> str:
        return f"{self.what}: {_show(self.before)} → {_show(self.now)}"


def _show(value: Any) -> str:
    return "(none)" if value is None else str(value)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists stay values."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _changed(prefix: str, before: dict, now: dict) -> list[Difference]:
    b, n = flatten(before, prefix), flatten(now, prefix)
    return [Difference(k, b.get(k), n.get(k)) for k in dict.fromkeys([*b, *n]) if b.get(k) != n.get(k)]


def differences(cfg: Config, record: dict) -> list[Difference]:
    """This run as it stands (environment, config, data, model) against an earlier run's record; nothing loads."""
    found = _changed("environment", record.get("environment") or {}, environment())
    config = record.get("config") or {}
    if config.get("sha256") and config["sha256"] != cfg.fingerprint():
        values = config.get("values")
        if isinstance(values, dict):
            found += _changed("config", values, config_values(cfg))
        else:
            found.append(Difference("config.sha256", config["sha256"], cfg.fingerprint()))
    before_data = {v.get("file"): v.get("sha256") for v in (record.get("data") or {}).values()
                   if isinstance(v, dict) and v.get("file")}
    now_data = stage_inputs(cfg, "train")
    for name in dict.fromkeys([*before_data, *now_data]):
        if before_data.get(name) != now_data.get(name):
            found.append(Difference(f"data.{name}", before_data.get(name), now_data.get(name)))
    found += _model_differences(cfg, record.get("base_model") or {})
    return found


def _model_differences(cfg: Config, before: dict) -> list[Difference]:
    from swiftci import hub

    found = []
    for key, now in (("id", cfg.model.id), ("source", "local" if cfg.model_local_path else cfg.model.source)):
        if before.get(key) is not None and before.get(key) != now:
            found.append(Difference(f"model.{key}", before.get(key), now))
    local = cfg.model_local_path
    if local is not None and before.get("files"):
        found += _changed("model.files", before["files"], hub.hash_folder(local))
    elif local is None and hub.COMMIT.match(cfg.model.revision or "") and before.get("revision_resolved"):
        if before["revision_resolved"] != cfg.model.revision:
            found.append(Difference("model.revision", before["revision_resolved"], cfg.model.revision))
    return found


def config_values(cfg: Config) -> dict:
    return cfg.model_dump(mode="json", exclude={"reproduce"})


def check_reproduce(cfg: Config, say=print) -> list[Difference]:
    """`reproduce:` (or `--like`): strict → exit 2 listing every difference; else one warning per difference."""
    rp = cfg.reproduce
    if rp is None:
        return []
    found = differences(cfg, read_record(cfg.resolve(rp.from_)))
    if found and rp.strict:
        raise UsageError(f"reproduce: this run differs from {rp.from_} in {len(found)} way(s):\n"
                         + "\n".join(f"  {d}" for d in found), kind="Drift",
                         hint="make the environment, config, data and model match that run, or drop `strict` to "
                              "run anyway with the differences recorded")
    for d in found:
        say(f"warning: differs from {rp.from_}: {d}")
    if not found:
        say(f"reproduce: same environment, config, data and model as {rp.from_}")
    return found


def reproduce_record(cfg: Config) -> dict | None:
    """For run.json: which run this one reproduces and how it differs from it."""
    rp = cfg.reproduce
    if rp is None:
        return None
    found = differences(cfg, read_record(cfg.resolve(rp.from_)))
    return {"from": str(rp.from_), "strict": rp.strict,
            "differences": [{"what": d.what, "before": d.before, "now": d.now} for d in found]}
