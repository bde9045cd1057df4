"""`swiftci fetch`: everything a run needs, downloaded and checked ahead of time, for runners without network.

- the base model and its tokenizer (one repository): downloaded and checked file by file (swiftci/hub.py); the
  checked hashes stay in the cache, so a later run with HF_HUB_OFFLINE=1 checks the cached files against them and
  calls no hub;
- lm-eval's data for built-in evaluate tasks: lm-eval builds each task once, which downloads its dataset into the
  datasets cache (HF_HOME); task YAMLs under `evaluate.task_dir` read local files and need nothing.

Copy the caches (HF_HOME, MODELSCOPE_CACHE) to the air-gapped runner, or run fetch there before the network is cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swiftci import hub
from swiftci.errors import StageError

if TYPE_CHECKING:
    from swiftci.config import Config


def run(cfg: Config) -> list[str]:
    """Fetch and check; one line per thing fetched, for people."""
    files = hub.prepare(cfg)
    if files.source == "local":
        lines = [f"model {cfg.model.id}: local folder, {len(files.files)} files hashed (nothing to download)"]
    else:
        how = "checked in the cache (no hub call)" if not files.hub_calls else "downloaded and checked"
        lines = [f"model {files.id}@{files.revision} ({files.source}): {len(files.files)} files {how} against the "
                 f"hub's sha256, in {files.path}"]
    if cfg.evaluate is not None:
        lines += _tasks(cfg)
    return lines


def _tasks(cfg: Config) -> list[str]:
    from swiftci import preflight

    manager, problems = preflight.task_manager(cfg)
    if problems:
        from swiftci.errors import ConfigError

        raise ConfigError(problems)
    local_dir = cfg.resolve(cfg.evaluate.task_dir) if cfg.evaluate.task_dir else None
    lines = []
    for task in cfg.evaluate.tasks:
        entry = manager.task_index.get(task)
        yaml_path = str(getattr(entry, "yaml_path", "") or "")
        if local_dir is not None and yaml_path.startswith(str(local_dir)):
            lines.append(f"task {task}: a local task YAML in {cfg.evaluate.task_dir}/ (its files are local)")
            continue
        try:
            manager.load_task_or_group([task])  # builds the task: lm-eval downloads its dataset into the cache
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds for a failed download
            raise StageError(f"fetch: lm-eval could not download the data of task {task}: {type(e).__name__}: {e}",
                             hint="run fetch where the hub is reachable (HF_ENDPOINT for a mirror)") from None
        lines.append(f"task {task}: dataset downloaded into the datasets cache")
    return lines
