"""The local tooling's notion of "now": the wall clock, or the instant ``BILLING_LOCAL_NOW`` names.

Every local command that asks "has this hour ended?" or "is this record inside the marketplace's
window?" reads :func:`now`: ``billing seed`` and ``billing local hour`` (the last ended hour),
``billing run`` (the dispatcher's and the biller's clock), ``billing status``/``reconcile`` (the settle
delay), and ``billing local up`` (its marketplace emulators' clocks; the stack's ``env`` carries the
variable on, so the commands pointed at it agree with its emulators). Pinning it makes a local session
(and the README's test) independent of the minute of the hour: without it, a run crossing the top of
the hour finds Google's window (two hours after the hour starts) closed. Local tooling only: the
Lambda layer takes its clock from its composition root (``Runtime(clock=...)``), never from here.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

VARIABLE = "BILLING_LOCAL_NOW"


class ClockError(ValueError):
    """``BILLING_LOCAL_NOW`` is set but is not an ISO 8601 instant with a time zone."""


def pinned() -> datetime | None:
    """The instant ``BILLING_LOCAL_NOW`` names, or None when it is unset (or empty)."""
    text = os.environ.get(VARIABLE, "").strip()
    if not text:
        return None
    try:
        instant = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ClockError(
            f"{VARIABLE}={text!r} is not an ISO 8601 instant, e.g. 2026-11-26T14:20:00Z"
        ) from None
    if instant.tzinfo is None:
        raise ClockError(f"{VARIABLE}={text!r} has no time zone: end it with Z or +00:00")
    return instant.astimezone(UTC)


def now() -> datetime:
    """``BILLING_LOCAL_NOW`` if set, else the wall clock (UTC)."""
    return pinned() or datetime.now(UTC)


def injected() -> Callable[[], datetime] | None:
    """A clock reading the pinned instant, for a Runtime or an emulator; None (their default: the wall
    clock) when nothing is pinned."""
    instant = pinned()
    return None if instant is None else (lambda: instant)
