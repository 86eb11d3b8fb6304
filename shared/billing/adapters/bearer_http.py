"""What the Google and Azure adapters share: bearer tokens, one JSON POST, and per-record retries."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiohttp
import stamina

from billing.domain.errors import ConfigurationError
from billing.domain.model import LedgerState, SubmitResult

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Mapping

T = TypeVar("T")


class TokenSource(Protocol):
    async def get(self, *, refresh: bool) -> str:
        """A bearer token; ``refresh`` asks for a new one (the last was refused)."""
        ...

    async def reload(self) -> bool:
        """Read the credentials again (a fresh token was refused too: they may have been rotated);
        True when they changed and the next ``get`` uses the new ones."""
        ...


class SecretRead(Protocol):
    def __call__(self, arn: str, *, fresh: bool = False) -> str:
        """A secret's text; ``fresh`` reads it from Secrets Manager whatever a cache holds."""
        ...


class TokenUnavailableError(Exception):
    """No access token could be had; nothing was sent."""


class FixedToken:
    """A fixed bearer token (BILLING_*_ACCESS_TOKEN, for the local emulators); refreshing is a no-op."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def get(self, *, refresh: bool) -> str:
        return self._token

    async def reload(self) -> bool:
        return False


class SecretReloader:
    """Reads a credentials secret (or key file) again after its credentials were refused, at most once a
    minute: a rotated secret is picked up by the next call, and a wrong one costs one read, not one a call."""

    INTERVAL = 60.0  # seconds

    def __init__(
        self,
        read: Callable[[], Awaitable[str]],
        current: str,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._current = current
        self._monotonic = monotonic
        self._last: float | None = None
        self._lock = asyncio.Lock()

    async def changed(self) -> str | None:
        """The secret's new text; None when it is unchanged or was read again less than a minute ago."""
        async with self._lock:
            now = self._monotonic()
            if self._last is not None and now - self._last < self.INTERVAL:
                return None
            self._last = now
            try:
                raw = await self._read()
            except (ConfigurationError, OSError):
                return None  # unreadable now: the refusal stands, and the call fails as it would have
            if raw == self._current:
                return None
            self._current = raw
            return raw


class NotSentError(Exception):
    """The request certainly did not reach the metering API."""


class MaybeSentError(Exception):
    """The request may have reached the metering API; its answer is unknown."""


class _RetryError(Exception):
    """Some answers were transient: try those again."""


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    body: Mapping[str, Any],
    tokens: TokenSource,
    refresh_on: Collection[int],
    headers_out: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """POST ``body`` with a bearer token; on a ``refresh_on`` status the token is refreshed once and the
    call repeated, and if that is refused too (or no token can be had) the credentials are read again once
    (a rotated secret). Raises NotSentError or MaybeSentError when there is no answer. ``headers_out``
    receives the answer's headers, names in lower case (Retry-After)."""
    return await request_json(session, "POST", url, body, tokens, refresh_on, headers_out=headers_out)


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Mapping[str, Any] | None,
    tokens: TokenSource,
    refresh_on: Collection[int],
    headers: Mapping[str, str] | None = None,
    headers_out: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """``post_json`` for any method (GET and PATCH of the marketplaces' subscription APIs); ``body`` None
    sends no body."""
    refresh = reloaded = False
    while True:
        try:
            token = await tokens.get(refresh=refresh)
        except TokenUnavailableError as exc:
            if not reloaded and await tokens.reload():
                refresh = reloaded = True
                continue
            raise NotSentError(f"no access token: {exc}") from exc
        try:
            sent = {**(headers or {}), "Authorization": f"Bearer {token}"}
            async with session.request(method, url, json=body, headers=sent) as response:
                raw = await response.read()
                status = response.status
                if headers_out is not None:
                    headers_out.clear()
                    headers_out.update((k.lower(), v) for k, v in response.headers.items())
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            # raised by the connector (DNS, TCP connect, TLS handshake, waiting for a pooled connection):
            # the request is written only once a connection is had, so not a byte of it was sent
            raise NotSentError(f"{type(exc).__name__}: {exc}") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            # a reset (ClientOSError ECONNRESET), a close (ServerDisconnectedError) or a read timeout once
            # the connection was had: the request may have been written and taken
            raise MaybeSentError(f"{type(exc).__name__} after sending: {exc}") from exc
        if status in refresh_on and not refresh:
            refresh = True
            continue
        if status in refresh_on and not reloaded and await tokens.reload():
            reloaded = True
            continue
        return status, json_or_none(raw)


def retry_after_seconds(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After as seconds: delay-seconds or an HTTP-date (RFC 9110, section 10.2.3); None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError):
        return None


def json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return None


def sticky(previous: SubmitResult | None, latest: SubmitResult) -> SubmitResult:
    """A record that may have reached the marketplace stays SUBMITTED until an answer says otherwise."""
    if (
        previous is not None
        and previous.state is LedgerState.SUBMITTED
        and latest.state is LedgerState.FAILED
    ):
        return SubmitResult(
            latest.dimension, LedgerState.SUBMITTED, reason=f"{latest.reason}; earlier: {previous.reason}"
        )
    return latest


async def submit_until_settled(
    send_once: Callable[[Mapping[str, T]], Awaitable[dict[str, SubmitResult]]],
    items: Mapping[str, T],
    attempts: int,
    settled: Callable[[SubmitResult], bool] = lambda result: not result.retryable,
) -> dict[str, SubmitResult]:
    """Send the records (keyed by dimension) again and again, only those not settled yet, with backoff
    and jitter, at most ``attempts`` times; return the last answer for each."""
    pending = dict(items)
    answered: dict[str, SubmitResult] = {}

    async def send_pending() -> None:
        for dimension, result in (await send_once(pending)).items():
            answered[dimension] = sticky(answered.get(dimension), result)
            if settled(result):
                pending.pop(dimension)

    # The first attempt runs outside a retry context (as Biller.bill's does): nearly every call settles
    # at once, and a stamina context costs tens of microseconds of CPU to set up. Records left pending
    # open one, whose first attempt stands for this one (it raises without sending): stamina then backs
    # off, reports and counts it exactly as if the context had been open from the start.
    await send_pending()
    if not pending:
        return answered
    first = True
    try:
        async for attempt in stamina.retry_context(
            on=_RetryError, attempts=attempts, wait_initial=0.05, wait_max=2.0
        ):
            with attempt:
                if first:
                    first = False
                    raise _RetryError
                await send_pending()
                if pending:
                    raise _RetryError
    except _RetryError:
        pass
    return answered
