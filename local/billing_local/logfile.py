"""A local run's log lines in a file instead of the terminal (``billing run`` without ``--verbose``).

The layer's Powertools ``Logger`` writes JSON lines to the stdout it found when its module was imported
(a ``logging.StreamHandler``); a failing run printed 1,665 of them between the progress bar and the
summary. :func:`divert` points those handlers at a file, and Python's last-resort handler (what prints
a library's warning when no handler is configured: the runner's, botocore's) too, so the terminal
keeps the progress and the summary and the file keeps every line, in order. The layer is untouched:
in Lambda its lines still go to stdout, that is, CloudWatch.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def run_log_path(directory: Path, now: datetime | None = None) -> Path:
    """A fresh file under ``directory``/logs, named by the start time (UTC) and the process id."""
    import os

    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return directory / "logs" / f"run-{stamp}-{os.getpid()}.jsonl"


@contextlib.contextmanager
def divert(path: Path) -> Iterator[None]:
    """Send the log lines of every stdout/stderr ``StreamHandler`` (and of the last-resort handler) to
    ``path`` (line-buffered: a Ctrl-C loses nothing written) for the block; then put them back."""
    # the layer's Powertools loggers are created at import: import them before moving their handlers
    import billing.entrypoints.biller  # noqa: F401

    path.parent.mkdir(parents=True, exist_ok=True)
    terminals = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    moved = [
        (handler, handler.stream)
        for logger in loggers
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler) and id(handler.stream) in terminals
    ]
    previous = logging.lastResort
    with path.open("a", buffering=1, encoding="utf-8") as sink:
        for handler, _stream in moved:
            handler.setStream(sink)
        last_resort = logging.StreamHandler(sink)
        last_resort.setLevel(logging.WARNING)  # as logging.lastResort's
        logging.lastResort = last_resort
        try:
            yield
        finally:
            logging.lastResort = previous
            for handler, stream in moved:
                handler.setStream(stream)
