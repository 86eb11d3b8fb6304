"""An HTTP double of the Elastic APM AWS Lambda extension's side that faces the agent (localhost:8200).

It serves what elastic/apm-aws-lambda serves the agent (apmproxy/receiver.go):

- ``GET /``: the APM Server's information (the extension proxies it to the APM Server);
- ``POST /intake/v2/events``: 202 whatever the body; ``?flushed=true`` is the agent's signal that the
  invocation's data is complete (the extension stops waiting for it); the body may be gzip- or
  deflate-encoded or not (accumulator/metadata.go ``GetUncompressedBytes``), and is NDJSON whose first
  line is the metadata (accumulator/batch.go ``AddAgentData``);
- ``POST /register/transaction``: 200, or 415 without the
  ``application/vnd.elastic.apm.transaction+ndjson`` content type and 400 without the
  ``x-elastic-aws-request-id`` header.

With ``keep=True`` it keeps every request, its body decoded and parsed (tests); with ``keep=False``
it only counts them (benchmarks: decoding would take the CPU being measured). ``intake_status``
makes the intake answer with another status (a failing extension), ``register_status`` every
registration (an extension that does not take them; ``counts["refused"]`` counts the registrations
answered 400 or more). Tests' controls: ``hold["intake"]`` or ``hold["register"]`` (an event) keeps
those answers until it is set, the request already counted and kept; ``close_connections`` answers
with ``Connection: close``; ``wait_for`` waits until the double has handled so many requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from billing_local.emulators.server import BackgroundServer

if TYPE_CHECKING:
    from collections.abc import Iterator

REGISTRATION_CONTENT_TYPE = "application/vnd.elastic.apm.transaction+ndjson"


@dataclass
class IntakeRequest:
    path: str
    flushed: bool
    content_encoding: str | None
    content_type: str | None
    events: list[dict[str, Any]]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e[kind] for e in self.events if kind in e]


@dataclass
class ApmExtension:
    keep: bool = True
    intake_status: int = 202
    register_status: int | None = None
    hold: dict[str, threading.Event] = field(default_factory=dict)
    close_connections: bool = False
    counts: dict[str, int] = field(
        default_factory=lambda: {"intake": 0, "register": 0, "flushed": 0, "refused": 0}
    )
    intake: list[IntakeRequest] = field(default_factory=list)
    registrations: list[IntakeRequest] = field(default_factory=list)
    _handled: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def wait_for(self, kind: str, count: int, timeout: float = 30.0) -> bool:
        """Wait until ``counts[kind]`` reaches ``count`` (requests are handled in the server's thread)."""
        with self._handled:
            return self._handled.wait_for(lambda: self.counts[kind] >= count, timeout)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for request in self.intake for e in request.of_type(kind)]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._info)
        app.router.add_post("/intake/v2/events", self._intake)
        app.router.add_post("/register/transaction", self._register)
        return app

    async def _info(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": "8.15.0", "build_flavor": "default"})

    async def _intake(self, request: web.Request) -> web.Response:
        raw = await request.read()
        flushed = request.query.get("flushed") == "true"
        with self._handled:
            if self.keep:
                self.intake.append(self._recorded(request, raw, flushed))
            self.counts["intake"] += 1
            self.counts["flushed"] += flushed
            self._handled.notify_all()
        return await self._answer("intake", web.Response(status=self.intake_status, text="ok"))

    async def _register(self, request: web.Request) -> web.Response:
        if self.register_status is not None:
            status = self.register_status
        elif request.headers.get("Content-Type") != REGISTRATION_CONTENT_TYPE:
            status = 415
        elif not request.headers.get("x-elastic-aws-request-id"):
            status = 400
        else:
            status = 200
        raw = await request.read()
        with self._handled:
            if status >= 400:
                self.counts["refused"] += 1
            else:
                if self.keep:
                    self.registrations.append(self._recorded(request, raw, False))
                self.counts["register"] += 1
            self._handled.notify_all()
        return await self._answer("register", web.Response(status=status))

    async def _answer(self, kind: str, response: web.Response) -> web.Response:
        hold = self.hold.get(kind)
        if hold is not None:
            await asyncio.to_thread(hold.wait)  # the server's loop keeps serving meanwhile
        if self.close_connections:
            response.force_close()
        return response

    @staticmethod
    def _recorded(request: web.Request, raw: bytes, flushed: bool) -> IntakeRequest:
        # aiohttp has already decoded a gzip or deflate body (its request parser's auto_decompress)
        encoding = request.headers.get("Content-Encoding")
        events = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        return IntakeRequest(request.path, flushed, encoding, request.headers.get("Content-Type"), events)


@contextlib.contextmanager
def apm_extension(keep: bool = True, port: int = 0) -> Iterator[tuple[str, ApmExtension]]:
    """``with apm_extension() as (url, extension):`` the double, served on 127.0.0.1."""
    extension = ApmExtension(keep=keep)
    with BackgroundServer(extension.app(), port=port) as server:
        yield server.url, extension
