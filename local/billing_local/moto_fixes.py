"""Three fixes to moto's SQS (5.2.5), applied to every moto server the local stack runs.

1. Linear queues. As shipped, every entry of a SendMessage(Batch) and every message a ReceiveMessage
returns reads ``Queue.attributes``, which computes all of the queue's attributes, three of them scans
of every message in the queue (``ApproximateNumberOfMessages*``): sending or receiving N messages
costs O(N²) (``billing demo --customers 3000`` took 16 minutes, or died with ``ReadTimeoutError``).
Here ``Queue.attributes`` is a mapping that computes only the attribute read, so a send reads
``ContentBasedDeduplication`` and scans nothing. (This was bench/moto_linear.py, the benchmarks' own
patch; the local stack needs it as much.)

2. A receive (and a wait for messages) reads the clock once, not twice per queued message. As shipped,
``Queue.messages`` (the visible, undelayed messages, which ReceiveMessage starts from) asks every message
``visible`` and ``delayed``, each a fresh ``unix_time_millis()`` through datetime arithmetic (~10 µs):
ReceiveMessage(10) took 22-34 ms at a depth of 2,000 and 1.4 ms at 100, so one poller could starve fifty
consumers, and a drain of N messages cost O(N²). Here the list is filtered against one instant, the
same test (``now > visible_at``, not ``now < delayed_until``) moto makes: still one pass over the list,
at ~0.1 µs a message. Real SQS does not slow with depth.

3. A thread-safety fix to DeleteMessage.

moto's server handles requests on threads. As shipped, ``Queue.delete_message`` rebuilds the queue's
message list without the queue's lock, while ``ReceiveMessage`` moves a message that reached
``maxReceiveCount`` to the dead-letter queue with an in-place ``list.remove`` on that same list. When
the two interleave, the rebuild's iteration skips the element after the removed one and the new list
loses it: a message vanishes from both queues (seen as customer-hours never billed in bench/chaos,
whose outage dead-letters messages while the runner deletes others). Two concurrent deletes can
likewise lose one of theirs. Real SQS does neither.

Here DeleteMessage removes the message in place, under the queue's lock: never a rebuild, so an
in-place removal by a concurrent receive cannot make it drop another message. It finds the message by
its receipt handle (every handle moto issued, kept while the message lives) instead of asking every
queued message whether it ever had that handle (3.3 ms a DeleteMessageBatch of 10 at a depth of 2,000,
0.07 ms at 100); a handle it does not know takes moto's scan, and its answers.

``python -m billing_local.moto_fixes -H HOST -p PORT`` runs moto's server with the fixes.
"""

from __future__ import annotations

import collections.abc
import contextlib
import json
import sys
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

_patched = False
# every receipt handle moto has issued -> its message, while the message lives (DeleteMessage's lookup)
RECEIVED: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
# moto's own ``Queue.attributes``, ``Queue.messages`` and ``Queue.delete_message``, kept so tests can show
# why the fixes exist
SHIPPED: dict[str, Any] = {}


class LazyAttributes(collections.abc.Mapping[str, Any]):
    """The same keys and values as moto's ``Queue.attributes``, each computed when read."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue
        keys = list(queue.BASE_ATTRIBUTES)
        if queue.fifo_queue:
            keys += queue.FIFO_ATTRIBUTES
        if queue.kms_master_key_id:
            keys += queue.KMS_ATTRIBUTES
        self._keys = keys

    def __getitem__(self, key: str) -> Any:
        from moto.core.utils import camelcase_to_underscores

        if key not in self._keys:
            raise KeyError(key)
        queue = self._queue
        # as moto's Queue.attributes computes them (moto/sqs/models.py, 5.2.5)
        if key == "Policy" and queue.policy:
            value = queue.policy
        elif key == "RedrivePolicy" and queue.redrive_policy:
            value = json.dumps(queue.redrive_policy)
        else:
            value = getattr(queue, camelcase_to_underscores(key))
        return str(value).lower() if isinstance(value, bool) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def patch() -> None:
    """Apply the fixes to moto's SQS models in this process (once)."""
    global _patched
    if _patched:
        return
    _patched = True
    from moto.sqs import models
    from moto.sqs.exceptions import ReceiptHandleIsInvalid
    from moto.sqs.models import Message, Queue

    def messages(self: Any) -> list[Any]:
        # moto's Message.visible and Message.delayed, at one instant for the whole list (through the
        # module's name, as they read it, so a test counting clock reads counts these)
        now = models.unix_time_millis()  # type: ignore[attr-defined]  # (moto imports it there)
        return [m for m in self._messages if now > m.visible_at and not now < m.delayed_until]

    shipped_mark_received = Message.mark_received

    def mark_received(self: Any, visibility_timeout: int | None = None) -> None:
        shipped_mark_received(self, visibility_timeout)
        RECEIVED[self.receipt_handle] = self

    def delete_message(self: Any, receipt_handle: str) -> None:
        with self._messages_lock:
            if receipt_handle in self.deleted_messages:
                return  # already deleted: gracefully ignored, as moto does
            message = RECEIVED.get(receipt_handle)
            if message is not None:
                # list.remove stops at the message, in C: the messages a drain deletes are the oldest
                # received, at the head of the list, so a delete does not slow with the depth behind them
                with contextlib.suppress(ValueError):  # not in this queue (a dead-letter queue's now)
                    self._messages.remove(message)
                    self.pending_messages.discard(message)
                    self.deleted_messages.update(message.all_receipt_handles)
                    return
            found = [m for m in self._messages if m.had_receipt_handle(receipt_handle)]
            if not found:  # a receive's unlocked in-place removal can make one scan skip an element
                found = [m for m in self._messages if m.had_receipt_handle(receipt_handle)]
            if not found:
                raise ReceiptHandleIsInvalid()
            for message in found:  # regardless of pending state, as moto does
                self.pending_messages.discard(message)
                self.deleted_messages.update(message.all_receipt_handles)
                self._messages.remove(message)

    SHIPPED["attributes"] = Queue.__dict__["attributes"]
    SHIPPED["delete_message"] = Queue.delete_message
    SHIPPED["messages"] = Queue.__dict__["messages"]
    SHIPPED["mark_received"] = Message.mark_received
    Queue.attributes = property(LazyAttributes)  # type: ignore[assignment,method-assign]
    Queue.messages = property(messages)  # type: ignore[assignment,method-assign]
    Queue.delete_message = delete_message  # type: ignore[method-assign]
    Message.mark_received = mark_received  # type: ignore[method-assign]


def main() -> None:
    patch()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:])


if __name__ == "__main__":
    main()
