"""The keys of the bill being worked on (customer, hour, marketplace, operation), for log lines written
where they are not at hand: stamina's retry hook sees only the error and the attempt number.

A ContextVar, so each asyncio task (each bill the local runner drives at once) has its own keys.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

_KEYS: ContextVar[Mapping[str, str]] = ContextVar("billing_log_keys", default=MappingProxyType({}))


@contextlib.contextmanager
def bound(**keys: str) -> Iterator[None]:
    """These keys, added to the current ones, inside the block."""
    token = _KEYS.set({**_KEYS.get(), **keys})
    try:
        yield
    finally:
        _KEYS.reset(token)


def add(**keys: str) -> None:
    """These keys from now until the enclosing ``bound`` block ends (for keys learnt half way)."""
    _KEYS.set({**_KEYS.get(), **keys})


def current() -> Mapping[str, str]:
    return _KEYS.get()
