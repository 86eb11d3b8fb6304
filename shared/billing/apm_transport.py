"""An Elastic APM transport for the Lambda shape: the invocation's events sent in the calling thread.

Selected with the agent's ``transport_class`` setting (template.yaml: ``ELASTIC_APM_TRANSPORT_CLASS:
billing.apm_transport.ServerlessTransport``). elasticapm 6.26's HTTP transport hands every event to
a sender thread; at the end of each invocation ``capture_serverless`` calls ``flush()``, which wakes
that thread and waits on an event while it processes, serializes, gzips and posts the invocation's
events. The handler waits either way; the hand-offs (two thread switches, and the GIL contended with
a thread that keeps running after it signalled) cost ~2 ms per warm invocation on top of the work
itself (bench/lambda_warm.py). Here ``queue()`` only keeps the event, and ``flush()`` does the work
in the calling thread: the agent's processors, its JSON serializer, one POST with ``?flushed=true``,
the way the agent's own flush ends an invocation.

What the APM Lambda extension relies on is kept (elastic/apm-aws-lambda, apmproxy/receiver.go and
accumulator/batch.go): every intake request body starts with a metadata line; the last request of an
invocation carries ``flushed=true`` (the extension's "agent done" signal), an empty one when there
was nothing to send, as the agent sends it to a local server only; ``send()`` keeps the signature
``capture_serverless`` calls for the transaction registration, and an ``HTTP <status>`` answer to it
still stops registrations (one request later, see below). The extension accepts a body gzip-,
deflate- or not encoded (accumulator/metadata.go ``GetUncompressedBytes``) and compresses its own
batches to the APM Server, so to the extension on the loopback interface nothing is compressed; to
any other server the agent's gzip applies.

The APM Server's version is not fetched (``GET /``, which the extension proxies to the APM Server, a
remote round trip the agent's thread makes at start unless ``skip_server_info``, as template.yaml
sets it): the agent then assumes a current server, as it does until the answer comes.

A request to the local extension is written, and its answer read only before the next request on the
connection (a registration's by the invocation's flush, a flush's by the next invocation's
registration, or by ``close()``), not while the handler waits for it: the extension has the bytes
once they are on the loopback socket, and it answers both the registration and the intake without
waiting for the APM Server (apmproxy/receiver.go: ``handleIntakeV2Events`` hands the body to a
channel without blocking, marks the flush and answers 202; ``handleTransactionRegistration`` answers
once ``OnAgentInit`` has updated its batch). The registration is there so that the extension can
report a transaction whose function timed out, and ``flushed=true`` is its "agent done" signal: both
need the request delivered, not its answer read in the handler's time. What an answer read later
means is unchanged, one request later (see ``_settle``). The function may now return before the
extension's server has read the flush; the extension still waits for it: its invocation loop
(app/run.go ``processEvent``) ends on the first of the flush signal, the platform's runtimeDone
event (from the Logs API, buffered up to 100 ms: logsapi/subscribe.go) or the deadline, and the
environment is frozen only once it has asked for the next event; a flush read after a runtimeDone
that came first would only end the next invocation's wait early. The extension's server (Go's
net/http, apmproxy/client.go) keeps the connection alive, and closes it once idle for its
ReadTimeout (the data receiver timeout, 15 s in template.yaml): a connection found closed is opened
again before the next request is written.

Failures are the agent's: logged ("Failed to submit message"), counted for its back-off, never
raised into the handler; a request waits at most the agent's ``server_timeout`` per socket
operation. Events wait no longer than the agent lets them (``api_request_time``, and at most
``QUEUE_CHILL_COUNT`` events): past either, the next ``queue()`` sends what is buffered, without
``flushed=true`` (a long dispatcher invocation ships its spans as it goes, as the agent's thread
would).
"""

from __future__ import annotations

import functools
import gzip
import http.client
import threading
from dataclasses import dataclass
from time import monotonic
from typing import Any
from urllib.parse import urlsplit

from elasticapm.contrib.serverless import aws as aws_serverless
from elasticapm.transport.exceptions import TransportException
from elasticapm.transport.http import Transport as HTTPTransport
from elasticapm.utils.logging import get_logger
from elasticapm.utils.threading import ThreadManager
from urllib3.util.wait import wait_for_read

logger = get_logger("billing.apm_transport")
# the logger capture_serverless tells of a refused registration with
serverless_logger = get_logger("elasticapm.serverless")

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# the agent's own default for how many events its queue holds before it wakes the sender thread
QUEUE_CHILL_COUNT = 500
REGISTRATION_PATH = "/register/transaction"


@dataclass(frozen=True, slots=True)
class _Pending:
    """A request written to the extension whose answer has not been read yet."""

    url: str
    registration: bool  # else an intake request, whose answer counts for the agent's back-off


class ServerlessTransport(HTTPTransport):  # type: ignore[misc]
    """The agent's HTTP transport with no sender thread: events are posted by the thread that flushes."""

    _closed: bool
    _metadata: dict[str, Any] | None

    def __init__(self, url: str, client: Any, **kwargs: Any) -> None:
        super().__init__(url, client, **kwargs)
        parts = urlsplit(url)
        self._local = parts.scheme == "http" and parts.hostname in LOOPBACK
        if self._local:
            # the extension decompresses whatever it gets and recompresses its batches itself
            self._compress_level = 0
        self._host, self._port = parts.hostname or "localhost", parts.port or 80
        self._netloc = parts.netloc
        self._events: list[tuple[str, Any]] = []
        self._due_at: float | None = None  # when the buffered events must go, flush or not
        self._events_lock = threading.Lock()
        self._send_lock = threading.Lock()  # one request at a time on the kept-alive connection
        self._connection: http.client.HTTPConnection | None = None
        self._pending: _Pending | None = None  # on self._connection; read before its next request

    # -- no sender thread -------------------------------------------------------------------------

    def start_thread(self, pid: int | None = None) -> None:
        previous = self.pid
        ThreadManager.start_thread(self, pid=pid)
        if previous is not None and previous != self.pid:
            self.handle_fork()

    def handle_fork(self) -> None:
        super().handle_fork()
        # the parent's socket, and the answer waiting on it, are not this process's to use
        self._connection, self._pending = None, None

    def stop_thread(self) -> None:
        self.close()

    def close(self) -> None:
        """At the process's exit (the agent's atexit hook): send what is left, as the agent does."""
        if self._closed:
            return
        self._closed = True
        self._send_buffered(flushed=False)
        # the last answer: its failure is logged like any other, and once it is read the extension
        # has handled every request (the process may end right after)
        self._settle()
        self._disconnect()

    # -- buffering ----------------------------------------------------------------------------------

    def queue(self, event_type: str | None, data: Any, flush: bool = False) -> None:
        """Keep the event for the flush.

        ``flush=True`` (the agent asks for it with an unhandled error) sends nothing by itself: in
        the Lambda shape ``capture_serverless`` captures that error at the end of the invocation,
        right before it ends the transaction and flushes, and one request then carries the error,
        the transaction and ``flushed=true`` (the agent's thread would post the error with
        ``flushed=true`` first, telling the extension the invocation was done before its
        transaction arrived).
        """
        if event_type is None or data is None or self._closed:
            return
        now = monotonic()
        with self._events_lock:
            self._events.append((event_type, data))
            if self._due_at is None:  # the setting is read once per batch, not at every event
                self._due_at = now + self._max_flush_seconds()
            due = len(self._events) >= QUEUE_CHILL_COUNT or now >= self._due_at
        if due:
            self._send_buffered(flushed=False)

    def flush(self) -> None:
        """Send every buffered event now, in this thread, ending with ``flushed=true``."""
        self._send_buffered(flushed=True)

    def _max_flush_seconds(self) -> float:
        seconds = self._max_flush_time_seconds
        return float(seconds) if seconds else float("inf")

    def _send_buffered(self, *, flushed: bool) -> None:
        with self._events_lock:
            events, self._events, self._due_at = self._events, [], None
        try:
            body = self._body(events)
        except Exception:  # the agent's thread would have died with it; the handler must not
            logger.error("Failed to serialize %d APM events; they are dropped", len(events), exc_info=True)
            return
        if body is None and not (flushed and self._local):
            return
        # the previous request's answer first: a failure it tells of counts for the back-off below,
        # as it would have if it had been read when that request was made
        self._settle()
        if body is None:
            body = b""  # the agent tells a local server (the extension) it is done even with no data
        elif not self.state.should_try():
            logger.error("dropping flushed data due to transport failure back-off")
            return
        try:
            self.send(body, forced_flush=flushed)
            if not self._local:  # else the answer, read later, tells success or failure (_settle)
                self.handle_transport_success()
        except Exception as exc:
            self.handle_transport_fail(exc)

    def _body(self, events: list[tuple[str, Any]]) -> bytes | None:
        """The intake request body: the metadata line, then one line per event the processors kept."""
        lines = []
        for event_type, data in events:
            processed = self._process_event(event_type, data)
            if processed is not None:
                lines.append(self._json_serializer({event_type: processed}))
                self._counts[event_type] += 1
        if not lines:
            return None
        if self._metadata is None:
            # built once; capture_serverless's add_extra_metadata keeps it current from then on
            self._metadata = self.client.build_metadata()
        lines.insert(0, self._json_serializer({"metadata": self._metadata}))
        lines.append("")
        body = "\n".join(lines).encode("utf-8")
        return gzip.compress(body, self._compress_level) if self._compress_level else body

    # -- the request ----------------------------------------------------------------------------------

    def send(
        self,
        data: bytes | str,
        forced_flush: bool = False,
        custom_url: str | None = None,
        custom_headers: dict[str, str] | None = None,
    ) -> str | None:
        """POST ``data`` as the agent's transport does, on a kept-alive connection to a local server.

        To the local extension, an intake request (``custom_url`` None) or a transaction
        registration is written and ``None`` returned at once; its answer is read before the
        connection's next request (``_settle``), where an answer of 400 or more means what it
        means today. Any other request to it raises ``TransportException`` ("HTTP <status>: ..."
        for an answer of 400 or more) as the agent's transport does. A server that is not on the
        loopback interface goes through the agent's own urllib3 path, answer read in this call.
        A request that cannot be written raises ``TransportException`` ("Unable to reach ...").
        """
        url = custom_url or self._url
        if forced_flush:
            url = f"{url}?flushed=true"
        netloc, target = _split(url)
        if not self._local or netloc != self._netloc:
            location: str | None = super().send(data, forced_flush, custom_url, custom_headers)
            return location
        headers: dict[Any, Any] = dict(self._headers) if self._headers else {}
        headers.update(self.auth_headers)
        if custom_headers:
            headers.update(custom_headers)
        else:
            headers[b"Content-Type"] = b"application/x-ndjson"
        body = data.encode("utf-8") if isinstance(data, str) else data
        registration = custom_url is not None and target.startswith(REGISTRATION_PATH)
        with self._send_lock:
            self._settle_locked()
            connection = self._connected()
            try:
                connection.request("POST", target, body=body, headers=headers)
            except Exception as exc:
                self._disconnect()
                raise TransportException(f"Unable to reach APM Server: {exc} (url: {url})", data) from exc
            if custom_url is None or registration:
                self._pending = _Pending(url, registration)
                return None
            status, answer, location = self._answer(connection, url)
        if status >= 400:
            raise _refused(status, answer)
        return location

    def _answer(self, connection: http.client.HTTPConnection, url: str) -> tuple[int, bytes, str | None]:
        """The answer to the request just written on ``connection``, read in full (the lock held)."""
        try:
            response = connection.getresponse()
            answer = response.read()
        except Exception as exc:
            self._disconnect()
            raise TransportException(f"Unable to reach APM Server: {exc} (url: {url})") from exc
        if response.will_close:
            self._disconnect()
        return response.status, answer, response.getheader("Location")

    def _settle(self) -> None:
        if self._pending is not None:
            with self._send_lock:
                self._settle_locked()

    def _settle_locked(self) -> None:
        """Read the answer to the request written last, and act on it as if it had been read then.

        It is normally in the socket's buffer already: the extension answered while the handler
        ran. An intake answer of 400 or more (429: "Temporarily rate limited") or no answer at all
        is the agent's transport failure (logged, counted for its back-off), anything else its
        success. A registration the extension refuses (400 or more) stops registrations as
        ``capture_serverless.send_partial_transaction`` stops them when the send raises
        "HTTP 4xx/5xx" (elasticapm/contrib/serverless/aws.py); a registration with no answer is
        logged as it logs one. Nothing is raised, and nothing is sent again: a request whose
        answer was lost may still have been handled. A connection the server closed is dropped
        here (``will_close``) or found closed by ``_connected`` before the next request is written.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        connection = self._connection
        if connection is None:  # _disconnect forgets the pending answer with its connection
            return
        try:
            status, answer, _ = self._answer(connection, pending.url)
            failure = _refused(status, answer) if status >= 400 else None
        except TransportException as exc:
            status, failure = 0, exc
        if not pending.registration:
            if failure is None:
                self.handle_transport_success()
            else:
                self.handle_transport_fail(failure)
        elif failure is not None:
            # capture_serverless's own reading of the failure: "HTTP 4xx/5xx" (not a 429's
            # "Temporarily rate limited") means the extension does not take registrations
            if status >= 400 and status != 429:
                aws_serverless.REGISTER_PARTIAL_TRANSACTIONS = False
                serverless_logger.info(
                    "APM Lambda Extension does not support partial transactions. "
                    "Disabling partial transaction registration."
                )
            else:
                serverless_logger.warning(
                    "Failed to send partial transaction to APM Lambda Extension: %s", failure
                )

    def _connected(self) -> http.client.HTTPConnection:
        connection = self._connection
        # a kept-alive connection the server has closed (idle timeout, or the environment was
        # frozen) reads as ready: open a new one rather than fail the request on it (urllib3 does so)
        if connection is not None and connection.sock is not None and wait_for_read(connection.sock, 0):
            self._disconnect()
            connection = None
        if connection is None:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._connection = connection
        return connection

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        self._pending = None  # its answer cannot be read any more
        if connection is not None:
            connection.close()


def _refused(status: int, answer: bytes) -> TransportException:
    """The agent's exception for an answer of 400 or more (elasticapm.transport.http.Transport.send)."""
    prefix = "Temporarily rate limited: " if status == 429 else f"HTTP {status}: "
    return TransportException(prefix + answer.decode("utf-8", errors="replace")[:10000])


@functools.lru_cache(maxsize=16)
def _split(url: str) -> tuple[str, str]:
    """A URL's host part and request target (the intake and registration URLs, parsed once each)."""
    parts = urlsplit(url)
    return parts.netloc, parts.path + (f"?{parts.query}" if parts.query else "")
