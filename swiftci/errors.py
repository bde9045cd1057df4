"""Errors that end a command, each with the exit code it means (see README, "Exit codes").

Library code raises these; only `swiftci.cli` turns them into messages and exit codes.
"""

from __future__ import annotations

import difflib

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_STAGE_FAILED = 3
EXIT_DIVERGED = 4


class SwiftCIError(Exception):
    """Base class: a message for humans, the exit code it maps to, a kind for reports and notifications, an
    optional hint (how to fix it; else the kind's usual fix), and `details` — what the failing stage had done
    before it failed, for its report."""

    exit_code = EXIT_STAGE_FAILED

    def __init__(self, message: str = "", *, kind: str | None = None, hint: str | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.kind = kind or type(self).__name__
        self.hint = hint
        self.details = dict(details or {})


class UsageError(SwiftCIError):
    """Bad command-line usage or a config that cannot mean what the user wants (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """One or more config problems, all reported at once (exit 2)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class StageError(SwiftCIError):
    """A stage could not run: missing file, runtime failure, out of memory (exit 3)."""

    exit_code = EXIT_STAGE_FAILED


class GateFailed(SwiftCIError):
    """A quality gate failed (exit 1)."""

    exit_code = EXIT_GATE_FAILED


class Diverged(SwiftCIError):
    """Training diverged: non-finite loss or gradient norm, or a gradient explosion (exit 4)."""

    exit_code = EXIT_DIVERGED

    def __init__(self, message: str, *, step: int, last_good_step: int):
        super().__init__(message)
        self.step = step
        self.last_good_step = last_good_step


# How to fix a failure of each kind, when the error carries no hint of its own (reports and notifications show it).
HINTS = {
    "Diverged": "lower `train.learning_rate` (try 10× lower), raise `train.warmup_ratio`, keep "
                "`train.max_grad_norm` at 1.0, use bf16 rather than fp16, and check the data for broken rows",
    "OutOfMemory": "lower `train.batch_size` and raise `train.gradient_accumulation`, set "
                   "`train.gradient_checkpointing: true`, lower `train.max_length`, or use `train.tuner: qlora`",
    "Stalled": "no optimizer step for `train.watchdog.stall_minutes`: check the data loader, the file system and "
               "multi-GPU communication; raise `stall_minutes` if steps are legitimately that slow",
    "Idle": "the GPU sat idle for `train.watchdog.idle_minutes`: look for a data loader or file system that cannot "
            "feed it (more `dataloader` workers, local copies of the data); raise `idle_minutes` if that is expected",
    "MaxRuntime": "continue from the saved checkpoint with `swiftci train --resume`, or raise `train.max_runtime`",
    "GateFailed": "the model got worse than the gates allow: read the eval report, compare data and "
                  "hyperparameters with the last passing run",
    "ConfigError": "fix swiftci.yaml as the messages say (`swiftci validate` shows every problem)",
    "UsageError": "fix the command line or swiftci.yaml as the message says (`swiftci validate` checks the config)",
}


def hint_for(kind: str) -> str:
    return HINTS.get(kind, "read the job log and the stage report; rerun with the same config to reproduce")


def closest(word: str, options) -> str | None:
    """The option a misspelt `word` most likely meant, for "did you mean" messages (None when nothing is close)."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return close[0] if close else None
