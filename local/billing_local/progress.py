"""Progress: a rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator

    from billing_local.runner import RunnerStats


@contextlib.contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a bar with counts and rate on a TTY, else a line every 10 %.

    ``total`` None: not known ahead (the dispatch's customers): a count, and a plain line at each
    advance. 0: nothing to do, said once ("0/0")."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.speed:>7.1f}/s" if False else "{task.fields[rate]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task(label, total=total, rate="")
            began = time.perf_counter()
            done = 0

            def advance_tty(n: int) -> None:
                nonlocal done
                done += n
                rate = done / max(time.perf_counter() - began, 1e-9)
                progress.update(task, advance=n, rate=f"{rate:,.0f}/s")

            yield advance_tty
        return
    step = max((total or 0) // 10, 1)
    done = 0
    if total is None:
        print(f"{label}: starting", file=sys.stderr, flush=True)
    elif total == 0:
        print(f"{label}: 0/0", file=sys.stderr, flush=True)
    began = time.perf_counter()

    def advance_plain(n: int) -> None:
        nonlocal done
        before = done
        done += n
        if done // step != before // step or done == total:
            rate = done / max(time.perf_counter() - began, 1e-9)
            count = str(done) if total is None else f"{done}/{total}"
            print(f"{label}: {count} ({rate:,.0f}/s)", file=sys.stderr, flush=True)

    yield advance_plain


class SettledProgress:
    """A runner's progress callback counting customer-hours finished, not invocations.

    A redelivered or duplicate message of a customer already finished, a failed invocation and a
    throttled customer requeued on its lane advance nothing, so the count never passes the customers
    sent (it read 2300/1000 when it counted invocations). Each lane's runner has its own stats; one
    instance serves them all (the consumers are tasks of one event loop, so no lock).
    """

    def __init__(self, advance: Callable[[int], None], only: Collection[str] | None = None) -> None:
        self.advance = advance
        self.only = only  # when given, the customers whose hour counts (those the total counted)
        self.settled: set[str] = set()
        self._succeeded: dict[int, int] = {}  # id(stats) -> successes already looked at

    def __call__(self, stats: RunnerStats) -> None:
        if stats.succeeded == self._succeeded.get(id(stats), 0):
            return  # this invocation failed: its message comes back
        self._succeeded[id(stats)] = stats.succeeded
        outcome = stats.outcomes[-1]
        if outcome.requeued or outcome.customer_id in self.settled:
            return
        if self.only is not None and outcome.customer_id not in self.only:
            return
        self.settled.add(outcome.customer_id)
        self.advance(1)
