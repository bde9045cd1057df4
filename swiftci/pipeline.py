"""Running stages: `swiftci run` runs the configured stages in order and stops at the first failure with that
stage's exit code; single-stage commands run one. Both tell the notification channels how it went."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from swiftci import preflight, stages
from swiftci.config import Config
from swiftci.errors import SwiftCIError, UsageError
from swiftci.notify import Message, Notifier, failure_message, finish_message


@contextmanager
def notifications(cfg: Config) -> Iterator[Notifier]:
    """A notifier for this command; on exit it waits a bounded time for queued messages, never longer."""
    notifier = Notifier(cfg)
    try:
        yield notifier
    finally:
        notifier.close()


def run_stage(cfg: Config, stage: str, notifier: Notifier, **options: Any) -> dict:
    """Run one stage; on failure, notify (what failed, why, the fix) and re-raise its error."""
    try:
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


def stage_finished(cfg: Config, stage: str, report: dict, notifier: Notifier) -> None:
    """A single-stage command's finish message (a pipeline sends one for the whole run instead)."""
    message = finish_message(cfg, {stage: report})
    message.title = f"{cfg.name}: {stage} {report.get('status', 'done')}"
    if stage != "train":
        message.attachment = None
    notifier.finish(message)


def run(cfg: Config, *, resume: bool = False, say: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every configured stage; return their reports. Raises the failing stage's error."""
    names = stages.configured(cfg)
    if not names:
        raise UsageError(f"{cfg.source}: no stage configured; add a `train` section")
    preflight.check(cfg, names)  # a run that must fail later fails now, before any model loads (exit 2)
    stages.clear(cfg, names)
    done: dict[str, dict] = {}
    with notifications(cfg) as notifier:
        for stage in names:
            say(f"==> {stage}")
            options = {"resume": resume} if stage == "train" else {}
            try:
                done[stage] = run_stage(cfg, stage, notifier, **options)
            except SwiftCIError:
                say(f"==> {stage} failed; its report: {cfg.stage_dir(stage)}")
                raise
            say(f"==> {stage}: {done[stage]['status']} — outputs in {cfg.stage_dir(stage)}")
            if stage != names[-1]:
                notifier.stage(Message("stage", f"{cfg.name}: {stage} {done[stage]['status']}"))
        notifier.finish(finish_message(cfg, done))
    return done
