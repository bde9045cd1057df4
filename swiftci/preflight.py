"""Before any model loads: what a run will read, checked at once, so that no GPU time is spent on a run that must
fail later. `swiftci validate`, `swiftci run` and every stage command call `check` with the stages still to come;
every problem is listed (with its field path and the fix) and the command exits 2.

What is checked, without loading a model or a dataset:
- train:    the data files are the bytes `data.sha256` pins (README, "Provenance"); every row parses in the
            configured format (all bad rows listed, the field named;
            for preference methods: a missing `chosen`, `chosen` equal to `rejected`, an empty prompt, a label
            that is not a boolean);
- evaluate: every task resolves (built-in, or a YAML under `task_dir`), the data files its YAML names exist, and
            every gate names a metric, and a filter, that its task produces.
The typed config (config.py) has already checked every setting on its own; quantize and deploy read nothing more.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from swiftci.errors import ConfigError, UsageError, closest

if TYPE_CHECKING:
    from swiftci.config import Config


def check(cfg: Config, names: list[str] | tuple[str, ...]) -> None:
    """Raise ConfigError (exit 2) listing every problem the stages `names` would meet."""
    problems: list[str] = []
    if "train" in names and cfg.train is not None:
        from swiftci import provenance

        problems += provenance.data_pin_problems(cfg) or data_problems(cfg)
    if "evaluate" in names and cfg.evaluate is not None:
        problems += task_manager(cfg)[1]
    if problems:
        raise ConfigError(problems)


# --- training data ----------------------------------------------------------------------------------------------


def data_problems(cfg: Config) -> list[str]:
    from swiftci import data, preference

    problems = []
    for field in ("train", "validation"):
        path = getattr(cfg.data, field)
        if path is None:
            continue
        try:
            if cfg.train.method == "sft":
                data.sft_conversations(cfg.resolve(path), cfg.data.format)
            else:
                preference.load_rows(cfg.resolve(path), cfg.train.method)
        except UsageError as e:
            problems.append(f"{cfg.source}: data.{field}: {e}")
    return problems


# --- evaluation tasks and gates ---------------------------------------------------------------------------------


def task_manager(cfg: Config) -> tuple[Any, list[str]]:
    """lm-eval's task index for the evaluate section, and the problems found in it. Indexes only the local task
    folder when every task is local (indexing lm-eval's ~15k built-in task YAMLs costs seconds)."""
    from lm_eval.tasks import TaskManager

    ev = cfg.evaluate
    task_dir = cfg.resolve(ev.task_dir) if ev.task_dir else None
    manager = None
    if task_dir:
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all(t in local.all_tasks for t in ev.tasks):
            manager = local
    manager = manager or TaskManager(include_path=str(task_dir) if task_dir else None)
    problems = []
    for i, task in enumerate(ev.tasks):
        if task not in manager.all_tasks:
            close = closest(task, manager.all_tasks)
            where = f" nor a task YAML in {ev.task_dir}/" if task_dir else ""
            problems.append(f"{cfg.source}: evaluate.tasks[{i}]: unknown lm-eval task '{task}': not a built-in "
                            f"task{where}" + (f" — did you mean '{close}'?" if close else "")
                            + " (`lm-eval ls tasks` lists the built-in ones)")
        else:
            problems += _data_file_problems(cfg, manager, task, task_dir or Path.cwd(), f"evaluate.tasks[{i}]")
    problems += _gate_problems(cfg, manager)
    return manager, problems


def _task_cfg(manager: Any, task: str) -> dict:
    entry = manager.task_index.get(task)
    cfg = getattr(entry, "cfg", None)
    return cfg if isinstance(cfg, dict) else {}


def _data_file_problems(cfg: Config, manager: Any, task: str, task_dir: Path, field: str) -> list[str]:
    """The local files a task YAML reads (`dataset_kwargs.data_files`, relative to task_dir, where lm-eval runs)."""
    files = (_task_cfg(manager, task).get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    elif isinstance(files, str):
        files = [files]
    missing = [f for f in files or [] if isinstance(f, str) and "://" not in f and not (task_dir / f).exists()]
    return [f"{cfg.source}: {field}: task '{task}' reads {f}, which does not exist in {task_dir} (paths in a task "
            "YAML's data_files are relative to evaluate.task_dir)" for f in missing]


def _gate_problems(cfg: Config, manager: Any) -> list[str]:
    """Each gate names a metric its task's YAML lists and a filter it defines (default `none`).
    Groups and Python tasks, whose metrics are known only after a run, are checked after scoring instead (a missing
    metric is then a config error too, exit 2, never a failed gate)."""
    problems = []
    for i, gate in enumerate(cfg.evaluate.gates):
        where = f"{cfg.source}: evaluate.gates[{i}].metric"
        if gate.task not in manager.all_tasks:
            continue  # not in evaluate.tasks (the config check says so) or unknown (reported above)
        task_cfg = _task_cfg(manager, gate.task)
        metric, _, filter_name = gate.metric_name.partition(",")
        metric_list = task_cfg.get("metric_list")
        if isinstance(metric_list, list):
            produced = sorted({m["metric"] for m in metric_list if isinstance(m, dict) and isinstance(m.get("metric"), str)})
            if produced and metric not in produced:
                problems.append(f"{where}: task '{gate.task}' produces {', '.join(produced)}, not '{metric}'")
                continue
        if filter_name and "metric_list" in task_cfg:
            filters = [f.get("name") for f in task_cfg.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
            if filter_name not in filters:
                problems.append(f"{where}: task '{gate.task}' has no filter '{filter_name}' (its filters: "
                                f"{', '.join(filters)}); write `{gate.task}/{metric}` or "
                                f"`{gate.task}/{metric},{filters[0]}`")
    return problems
