"""One event loop per execution environment, so pools and HTTP sessions survive warm invocations."""

from __future__ import annotations

import asyncio
from typing import Any

from aws_lambda_powertools.utilities.batch import AsyncBatchProcessor

LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)


class LoopBatchProcessor(AsyncBatchProcessor):
    """Powertools' async batch processor, always on the module's loop.

    Outside Lambda, Powertools runs each batch with ``asyncio.run``, which would close the loop
    the asyncpg pool and the HTTP sessions live on; here every batch runs on ``LOOP``.
    """

    def async_process(self) -> list[tuple[Any, ...]]:
        async def process_all() -> list[tuple[Any, ...]]:
            return list(await asyncio.gather(*[self._async_process_record(r) for r in self.records]))

        return LOOP.run_until_complete(process_all())
