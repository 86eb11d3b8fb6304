"""Capture Elastic APM intake events locally instead of posting them to an APM Server.

``CaptureTransport`` is selected with ``ELASTIC_APM_TRANSPORT_CLASS`` (or ``transport_class=``).
It runs every event through the agent's own processors (so sanitisation applies exactly as on the
wire) and its serializer, keeps the lines (``CAPTURE.events`` parses them when read) and, when
``CAPTURE.path`` is set, appends them to an NDJSON file in the intake v2 format: at every flush a
``{"metadata": ...}`` line, then the events, the way the agent posts one request body per Lambda
invocation.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elasticapm.transport.base import Transport


@dataclass
class Capture:
    # every line as the agent serialized it (metadata lines included), parsed only when read: the
    # agent's own transport serializes its events and never parses them back, nor should this one
    # on the event loop of a run (bench/profile.py measures that loop)
    lines: list[str] = field(default_factory=list)
    path: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _parsed: list[dict[str, Any]] = field(default_factory=list)

    def reset(self, path: Path | None = None) -> None:
        with self.lock:
            self.lines.clear()
            self._parsed.clear()
            self.path = path
            if path is not None:
                path.write_text("")

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every line so far, parsed (metadata lines included)."""
        with self.lock:
            if len(self._parsed) < len(self.lines):
                self._parsed.extend(json.loads(line) for line in self.lines[len(self._parsed) :])
            return list(self._parsed)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e[kind] for e in self.events if kind in e]

    def write(self, lines: list[str]) -> None:
        with self.lock:
            self.lines.extend(lines)
            if self.path is not None:
                with self.path.open("a") as sink:
                    sink.writelines(line + "\n" for line in lines)


CAPTURE = Capture()


class CaptureTransport(Transport):  # type: ignore[misc]
    """An agent transport that keeps events in memory (and a file) synchronously, with no thread."""

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()

    def queue(self, event_type: str | None, data: Any, flush: bool = False) -> None:
        if event_type not in (None, "close") and data is not None:
            processed = self._process_event(event_type, data)
            if processed is not None:
                # the agent's serializer: the lines are exactly what would be sent
                line = self._json_serializer({event_type: processed})
                with self._pending_lock:
                    self._pending.append(line)
        if flush:
            self.flush()

    def flush(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        if pending:
            metadata = self._json_serializer({"metadata": self.client.build_metadata()})
            CAPTURE.write([metadata, *pending])

    def start_thread(self, pid: int | None = None) -> None:
        """No background thread: events are captured as they are queued."""

    def close(self) -> None:
        self.flush()
