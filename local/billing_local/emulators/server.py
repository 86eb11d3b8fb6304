"""Run an aiohttp application on 127.0.0.1 in a background thread with its own event loop.

The emulators run beside the code under test, never on its event loop, so their work does not
show up as latency or lag in the runner being measured.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

if TYPE_CHECKING:
    from types import TracebackType


class BackgroundServer:
    """`with BackgroundServer(app) as server: server.url` serves ``app`` until the block ends."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulator", daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> BackgroundServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.url = future.result(timeout=30)
        return self

    async def _start(self) -> str:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        sockets = cast("Any", site._server).sockets  # aiohttp keeps the bound server private
        port = sockets[0].getsockname()[1]
        return f"http://{self._host}:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
