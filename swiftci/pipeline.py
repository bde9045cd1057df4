"""Running stages: `swiftci run` runs the configured stages in order and stops at the first failure with that
stage's exit code; single-stage commands run one. Both tell the notification channels how it went."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from swiftci import preflight, stages
from swiftci.config import Config
from swiftci.errors import SwiftCIError, UsageError
from swiftci.notify import Message, Notifier, failure_message, finish_message, null_notifier


@contextmanager
def notifications(cfg: Config) -> Iterator[Notifier]:
    """A notifier for this command; on exit it waits a bounded time for queued messages, never longer. A process of
    a distributed training other than the one that speaks for it (distributed.notifies) sends nothing."""
    from swiftci import distributed

    notifier = Notifier(cfg) if distributed.notifies() else null_notifier(cfg)
    try:
        yield notifier
    finally:
        notifier.close()


def run_stage(cfg: Config, stage: str, notifier: Notifier, **options: Any) -> dict:
    """Run one stage; on failure, notify (what failed, why, the fix) and re-raise its error. Before the stage, what
    it will read is checked (data pins, `reproduce:`, the base model's bytes: README, "Provenance")."""
    try:
        _check_inputs(cfg, stage, options)
        if stage == "train":
            from swiftci import train

            return train.run(cfg, notifier=notifier, **options)
        if stage == "evaluate":
            from swiftci import evaluate

            return evaluate.run(cfg, **options)
        if stage == "quantize":
            from swiftci import quantize

            return quantize.run(cfg, **options)
        if stage == "deploy":
            from swiftci import deploy

            return deploy.run(cfg, **options)
        raise UsageError(f"unknown stage {stage!r}")
    except SwiftCIError as e:
        notifier.failure(failure_message(cfg, stage, stages.train_run_id(cfg), stages.error_of(e)))
        raise


def _check_inputs(cfg: Config, stage: str, options: dict) -> None:
    """Before a stage loads anything: the data pins and the earlier run to reproduce (train), then the base model,
    downloaded and checked file by file, for the stages that load it (deploy only ships it without a train stage;
    evaluate and quantize with --model may not need it, but an adapter needs its base)."""
    from swiftci import hub, provenance

    if stage == "train":
        provenance.check_data_pins(cfg)
        provenance.check_reproduce(cfg)
    loads_base = stage in ("train", "evaluate", "quantize") or (stage == "deploy" and cfg.train is None)
    if stage != "train" and options.get("model_dir"):
        loads_base = False
    # a local folder is hashed file by file for train's record and for pins; else it is read as it is
    if loads_base and (cfg.model_local_path is None or stage == "train" or cfg.model.sha256 is not None):
        hub.prepare(cfg)


def stage_finished(cfg: Config, stage: str, report: dict, notifier: Notifier) -> None:
    """A single-stage command's finish message (a pipeline sends one for the whole run instead)."""
    message = finish_message(cfg, {stage: report})
    message.title = f"{cfg.name}: {stage} {report.get('status', 'done')}"
    if stage != "train":
        message.attachment = None
    notifier.finish(message)


def run(cfg: Config, *, resume: bool = False, reuse: bool = False, say: Callable[[str], None] = print
        ) -> dict[str, dict]:
    """Run every configured stage; return their reports. Raises the failing stage's error.

    `reuse` keeps the stages at the head of the pipeline whose finished outputs in the output folder came from the
    same config sections, files and model (stages.reusable); `resume` keeps a finished training the same way. Any
    other finished run there is started over, with a notice."""
    names = stages.configured(cfg)
    if not names:
        raise UsageError(f"{cfg.source}: no stage configured; add a `train` section")
    preflight.check(cfg, names)  # a run that must fail later fails now, before any model loads (exit 2)
    kept = _reusable_head(cfg, names, reuse, resume)
    if not reuse and len(kept) < len(names) and stages.reusable(cfg, names[0]) is not None:
        say(f"note: {cfg.stage_dir(names[0])} holds a finished {names[0]} of this same config and inputs; starting "
            "over (`swiftci run --reuse` keeps the stages whose config and inputs are unchanged)")
    stages.clear(cfg, names[len(kept):])
    done: dict[str, dict] = {}
    with notifications(cfg) as notifier:
        for stage in names:
            if stage in kept:
                done[stage] = kept[stage]
                say(f"==> {stage}: reusing the finished run in {cfg.stage_dir(stage)} (same config, inputs and files)")
                continue
            _group(stage, say)
            options = {"resume": resume} if stage == "train" else {}
            try:
                done[stage] = run_stage(cfg, stage, notifier, **options)
            except SwiftCIError:
                say(f"==> {stage} failed; its report: {cfg.stage_dir(stage)}")
                raise
            finally:
                _group(None, say)
            say(f"==> {stage}: {done[stage]['status']} — outputs in {cfg.stage_dir(stage)}")
            if stage != names[-1]:
                notifier.stage(Message("stage", f"{cfg.name}: {stage} {done[stage]['status']}"))
        notifier.finish(finish_message(cfg, done))
    return done


def _reusable_head(cfg: Config, names: list[str], reuse: bool, resume: bool) -> dict[str, dict]:
    """The finished stages at the head of the pipeline that this run keeps: with `reuse`, every one in a row that
    stages.reusable accepts (a later stage depends on the earlier ones); with `resume`, a finished training."""
    kept: dict[str, dict] = {}
    for stage in names:
        if not (reuse or (resume and stage == "train")):
            break
        report = stages.reusable(cfg, stage)
        if report is None:
            break
        kept[stage] = report
    return kept


def _group(stage: str | None, say: Callable[[str], None]) -> None:
    """One collapsible group per stage in a GitHub Actions log (on the same stream as the stage's lines, so the
    markers stay in order with them); elsewhere a plain header."""
    in_actions = os.environ.get("GITHUB_ACTIONS") == "true"
    if stage is None:
        if in_actions:
            say("::endgroup::")
        return
    if in_actions:
        say(f"::group::swiftci {stage}")
    say(f"==> {stage}")
