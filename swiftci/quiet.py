"""Third-party output kept out of the CI log. Importing torchao, peft's dispatchers or gptqmodel prints library
load failures, torch deprecation warnings and a banner; gptqmodel logs every layer and kernel. That output goes to
a log file in the stage folder instead, and when the stage fails the file's last lines are shown with the error.
Both file descriptors are redirected, so native libraries' output is caught too."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LIBRARIES_LOG = "libraries.log"  # in each stage folder: what third-party libraries printed
NOISY = ("torch", "transformers", "transformers.trainer", "peft", "gptqmodel")  # loud on import, in that order


def progress_bars_off_unless_a_terminal() -> None:
    """No `\\r` progress bars in a log: tqdm (lm-eval, datasets, transformers) reads TQDM_DISABLE once, on import,
    so this runs before any library is imported."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def captured(log: Path, *, append: bool = True, expected: tuple[type[BaseException], ...] = (),
             label: str = "library output") -> Iterator[None]:
    """Everything written to stdout and stderr inside goes to `log`. On an exception (other than `expected` ones,
    which are verdicts, not crashes) the log's last 30 lines are printed with it."""
    sys.stdout.flush()
    sys.stderr.flush()
    log.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(1), os.dup(2)
    with open(log, "ab" if append else "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        except expected:
            _restore(saved)
            raise
        except BaseException:
            _restore(saved)
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
            print("\n".join([f"{label} (last lines; all in {log.name}):", *tail]), file=sys.stderr)
            raise
        else:
            _restore(saved)


def _restore(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in saved:
        os.close(fd)


def import_libraries(stage_dir: Path, names: tuple[str, ...] = NOISY) -> None:
    """Import the loud libraries once, their output into the stage's libraries.log; later imports are silent.
    One that is missing or fails to import is left for the stage's own import to report."""
    missing = [n for n in names if n not in sys.modules]
    if not missing:
        return
    with captured(stage_dir / LIBRARIES_LOG):
        for name in missing:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported by the stage's own import, with its traceback
                pass
