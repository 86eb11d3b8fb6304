"""The current bill's deadline, for code deep in the adapters that must stop waiting in time."""

from __future__ import annotations

import contextvars

# The event-loop time by which the current bill must be done (set by the Biller from
# BILLING_INVOCATION_BUDGET_SECONDS); None outside a bill.
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("billing_deadline", default=None)
# What a wait must leave of the budget: one more call and the ledger's record of the answers.
RESERVE_SECONDS = 5.0


# Outside a bill (an adapter called on its own), waits stop after this long all the same.
DEFAULT_BUDGET_SECONDS = 45.0


def budget_left(loop_time: float, started: float) -> float:
    """Seconds of the bill's budget left for waiting; outside a bill, of a default budget from ``started``."""
    deadline = DEADLINE.get()
    if deadline is None:
        deadline = started + DEFAULT_BUDGET_SECONDS
    return deadline - loop_time - RESERVE_SECONDS
