"""`swiftci run`: the configured stages in order, stopping at the first failure with that stage's exit code."""

from __future__ import annotations

from collections.abc import Callable

from swiftci.config import Config
from swiftci.errors import SwiftCIError

STAGES = ("train", "evaluate", "quantize")


def configured_stages(cfg: Config) -> list[str]:
    return [s for s in STAGES if getattr(cfg, s, None) is not None]


def run(cfg: Config, *, resume: bool = False, say: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every configured stage; return their reports. Raises the failing stage's error."""
    done: dict[str, dict] = {}
    stages = configured_stages(cfg)
    if not stages:
        from swiftci.errors import UsageError

        raise UsageError(f"{cfg.source}: no stage configured; add a `train` section")
    for stage in stages:
        say(f"==> {stage}")
        try:
            if stage == "train":
                from swiftci import train

                done[stage] = train.run(cfg, resume=resume)
            elif stage == "evaluate":
                from swiftci import evaluate

                done[stage] = evaluate.run(cfg)
            elif stage == "quantize":
                from swiftci import quantize

                done[stage] = quantize.run(cfg)
        except SwiftCIError:
            say(f"==> {stage} failed; its report: {cfg.stage_dir(stage)}")
            raise
        say(f"==> {stage}: {done[stage]['status']} — outputs in {cfg.stage_dir(stage)}")
    return done
