"""The unit tier runs with no network: pytest-socket refuses every Internet socket (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from pytest_socket import SocketBlockedError


def test_a_unit_test_cannot_open_even_a_loopback_socket() -> None:
    with pytest.raises(SocketBlockedError), pytest.warns(UserWarning, match="socket.socket"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)


async def test_an_event_loop_still_runs() -> None:
    # asyncio's loop wakes itself through a Unix socketpair, which stays allowed
    assert await asyncio.sleep(0, result=1) == 1
