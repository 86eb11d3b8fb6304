"""A marketplace quota for the emulators: at most ``rate`` calls in any one-second window, per key.

The key is what the marketplace counts the quota against: the AWS account (the SigV4 access key),
Google's producer project (the service name), Azure's publisher (the bearer token's app). A refused call
is answered with the marketplace's documented throttle (the emulator's job) and counted here.

Besides enforcing, it records when every call *arrived* (refused ones included), so a bench can read
the most calls any one-second window saw: what the billing side's pacing controls.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Quota:
    """``rate`` calls a second per key (0 = no quota); thread-safe (the emulators' servers run in threads)."""

    rate: float = 0.0
    clock: Callable[[], float] = time.monotonic
    admitted: int = 0
    refused: int = 0
    arrivals: list[float] = field(default_factory=list)  # every call's arrival time, in order
    _windows: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, key: str = "") -> float | None:
        """None when the call is within the quota; otherwise the seconds until it would be."""
        with self._lock:
            now = self.clock()
            self.arrivals.append(now)
            if not self.rate:
                self.admitted += 1
                return None
            window = self._windows.setdefault(key, deque())
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= self.rate:
                self.refused += 1
                return max(0.0, window[0] + 1.0 - now)
            window.append(now)
            self.admitted += 1
            return None

    def reset(self, rate: float | None = None) -> None:
        with self._lock:
            if rate is not None:
                self.rate = rate
            self.admitted = self.refused = 0
            self.arrivals.clear()
            self._windows.clear()

    def max_arrivals_per_second(self) -> int:
        """The most calls that arrived within any one-second window (refused ones included)."""
        with self._lock:
            times = list(self.arrivals)
        most = 0
        for i, start in enumerate(times):
            most = max(most, bisect.bisect_left(times, start + 1.0, lo=i) - i)
        return most
