"""What the fault-injection suite (tests/e2e/test_fault_injection.py) and bench/chaos both inject with.

Local tooling, never deployed: error answers in each marketplace's own format, a middleware slot in front
of an emulator, AWS metering clients with short timeouts, and a delegating proxy to fault one method of a
port.
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Callable


def marketplace_error(marketplace: str, status: int) -> web.Response:
    """An error answer of ``status`` in the marketplace's own format (AWS JSON 1.1, Google, Azure)."""
    if marketplace == "aws":
        code = {429: "ThrottlingException", 500: "InternalServiceErrorException"}.get(
            status, "ServiceUnavailableException"
        )
        return web.json_response(
            {"__type": code, "message": "injected"},
            status=status,
            headers={"x-amzn-ErrorType": code},
            content_type="application/x-amz-json-1.1",
        )
    if marketplace == "gcp":
        name = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}.get(
            status, "DEADLINE_EXCEEDED"
        )
        return web.json_response(
            {"error": {"code": status, "message": "injected", "status": name}}, status=status
        )
    return web.json_response({"code": "ServerError", "message": "injected", "details": []}, status=status)


def reset_connection(request: web.Request) -> None:
    """Drop ``request``'s TCP connection with a reset (RST), not a clean close (FIN).

    SO_LINGER on with a zero timeout makes close() discard unsent data and send RST (socket(7)), as a
    crashed load balancer or a NAT that forgot the flow does; the client sees ECONNRESET while it reads
    the answer. Call it after the emulator did the work: the request was received and taken.
    """
    transport = request.transport
    if transport is None:  # already gone: nothing left to reset
        return
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def with_middleware(
    create_app: Callable[[Any], web.Application], middleware: Callable[[], Any]
) -> Callable[[Any], web.Application]:
    """An emulator's ``create_app`` whose application runs ``middleware()`` in front of its handlers."""

    def create(state: Any) -> web.Application:
        app = create_app(state)
        app.middlewares.append(middleware())
        return app

    return create


class ShortMarketplaceTimeouts:
    """An aioboto3 session whose AWS metering clients wait ``timeout_s`` for an answer."""

    def __init__(self, session: Any, timeout_s: float) -> None:
        self._session = session
        self._timeout_s = timeout_s

    def client(self, service: str, config: Any = None, **kwargs: Any) -> Any:
        from botocore.config import Config

        if service == "meteringmarketplace":
            short = Config(connect_timeout=self._timeout_s, read_timeout=self._timeout_s)
            config = (config or Config()).merge(short)
        return self._session.client(service, config=config, **kwargs)


class Proxy:
    """Delegates everything to ``inner``; subclasses override what they fault."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
