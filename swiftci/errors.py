"""Errors that end a command, each with the exit code it means (see README, "Exit codes").

Library code raises these; only `swiftci.cli` turns them into messages and exit codes.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_STAGE_FAILED = 3
EXIT_DIVERGED = 4


class SwiftCIError(Exception):
    """Base class: a message for humans, the exit code it maps to, and a kind for reports and notifications."""

    exit_code = EXIT_STAGE_FAILED

    def __init__(self, message: str = "", *, kind: str | None = None):
        super().__init__(message)
        self.kind = kind or type(self).__name__


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
