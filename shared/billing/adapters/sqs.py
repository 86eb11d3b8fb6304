"""The billing queue through aioboto3: SendMessageBatch, 10 entries a call, several calls in flight."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import stamina
from botocore.exceptions import BotoCoreError, ClientError

from billing.domain.errors import ConfigurationError, PermanentError, TransientError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from billing.domain.messages import BillMessageV1
    from billing.domain.model import Marketplace

BATCH = 10  # SendMessageBatch's limit


class _PartialFailure(Exception):
    def __init__(self, failed: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(failed)} entries failed")
        self.failed = failed


class SqsQueue:
    """Sends every message or raises; entries a batch response reports as failed are sent again."""

    def __init__(
        self,
        client: Any,
        queue_url: str | None,
        in_flight: int = 8,
        attempts: int = 5,
        lanes: Mapping[Marketplace, str] | None = None,
    ) -> None:
        self._client = client
        self._url = queue_url
        self._in_flight = in_flight
        self._attempts = attempts
        self._lanes = dict(lanes or {})

    def url(self, lane: Marketplace | None) -> str:
        """The lane's queue, or the default queue for a marketplace without a lane of its own."""
        url = self._lanes.get(lane) if lane is not None else None
        url = url or self._url
        if url is None:
            raise ConfigurationError(
                f"no queue for the {lane} lane: set BILLING_{str(lane).upper()}_QUEUE_URL"
            )
        return url

    async def send(
        self, messages: Sequence[BillMessageV1], lane: Marketplace | None = None, delay_seconds: int = 0
    ) -> int:
        url = self.url(lane)
        batches: asyncio.Queue[list[BillMessageV1] | None] = asyncio.Queue()
        for start in range(0, len(messages), BATCH):
            batches.put_nowait(list(messages[start : start + BATCH]))
        workers = min(self._in_flight, batches.qsize())
        for _ in range(workers):
            batches.put_nowait(None)
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while (batch := batches.get_nowait()) is not None:
                await self._send_batch(url, batch, delay_seconds)
                sent += len(batch)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
        except ExceptionGroup as failed:
            # the first failure is the story; the others are the same error from the other workers
            raise failed.exceptions[0] from None
        return sent

    async def _send_batch(self, url: str, batch: list[BillMessageV1], delay_seconds: int) -> None:
        entries: dict[str, dict[str, Any]] = {
            str(i): {"Id": str(i), "MessageBody": m.to_body()} for i, m in enumerate(batch)
        }
        if delay_seconds:
            for entry in entries.values():
                entry["DelaySeconds"] = delay_seconds
        try:
            async for attempt in stamina.retry_context(
                on=(_PartialFailure, TransientError), attempts=self._attempts, wait_initial=0.05, wait_max=2.0
            ):
                with attempt:
                    try:
                        response = await self._client.send_message_batch(
                            QueueUrl=url, Entries=list(entries.values())
                        )
                    except ClientError as exc:
                        code = exc.response.get("Error", {}).get("Code", "")
                        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500) >= 500:
                            raise TransientError(f"SQS {code}") from exc
                        raise PermanentError(f"SQS refused the batch: {code}: {exc}") from exc
                    except (BotoCoreError, OSError) as exc:
                        raise TransientError(f"SQS unreachable: {type(exc).__name__}") from exc
                    for ok in response.get("Successful", []):
                        entries.pop(ok["Id"], None)
                    failed = response.get("Failed", [])
                    if any(f.get("SenderFault") for f in failed):
                        codes = sorted({f.get("Code", "?") for f in failed if f.get("SenderFault")})
                        raise PermanentError(f"SQS refused entries as malformed: {', '.join(codes)}")
                    if entries:
                        raise _PartialFailure(failed)
        except _PartialFailure as exc:
            raise TransientError(f"SQS kept failing {len(exc.failed)} entries of a batch") from exc
