"""Tests reach loopback only: pytest-socket's --allow-hosts (pyproject.toml) refuses any other address
before a packet leaves, so no test can depend on the network or on a real marketplace."""

from __future__ import annotations

import socket

import pytest
from pytest_socket import SocketConnectBlockedError


def test_a_connection_off_the_machine_is_refused_before_it_is_made() -> None:
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never routed, so only the guard can answer at once
    with (
        socket.socket() as s,
        pytest.raises(SocketConnectBlockedError),
        pytest.warns(UserWarning, match="192.0.2.1"),  # pytest-socket also warns, naming the host
    ):
        s.connect(("192.0.2.1", 443))


def test_loopback_is_reachable() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            conn, _ = server.accept()
            conn.close()
