"""Two fixes to moto's SQS (5.2.5), applied to every moto server the local stack runs.

1. Linear queues. As shipped, every entry of a SendMessage(Batch) and every message a ReceiveMessage
returns reads ``Queue.attributes``, which computes all of the queue's attributes, three of them scans
of every message in the queue (``ApproximateNumberOfMessages*``): sending or receiving N messages
costs O(N²) (``billing demo --customers 3000`` took 16 minutes, or died with ``ReadTimeoutError``).
Here ``Queue.attributes`` is a mapping that computes only the attribute read, so a send reads
``ContentBasedDeduplication`` and scans nothing. (This was bench/moto_linear.py, the benchmarks' own
patch; the local stack needs it as much.)

2. A thread-safety fix to DeleteMessage.

moto's server handles requests on threads. As shipped, ``Queue.delete_message`` rebuilds the queue's
message list without the queue's lock, while ``ReceiveMessage`` moves a message that reached
``maxReceiveCount`` to the dead-letter queue with an in-place ``list.remove`` on that same list. When
the two interleave, the rebuild's iteration skips the element after the removed one and the new list
loses it: a message vanishes from both queues (seen as customer-hours never billed in bench/chaos,
whose outage dead-letters messages while the runner deletes others). Two concurrent deletes can
likewise lose one of theirs. Real SQS does neither.

Here DeleteMessage removes the message in place, under the queue's lock: never a rebuild, so an
in-place removal by a concurrent receive cannot make it drop another message.

``python -m billing_local.moto_fixes -H HOST -p PORT`` runs moto's server with both fixes.
"""

from __future__ import annotations

import collections.abc
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

_patched = False
# moto's own ``Queue.attributes`` and ``Queue.delete_message``, kept so tests can show why the fixes exist
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
    """Apply both fixes to moto's SQS models in this process (once)."""
    global _patched
    if _patched:
        return
    _patched = True
    from moto.sqs.exceptions import ReceiptHandleIsInvalid
    from moto.sqs.models import Queue

    def delete_message(self: Any, receipt_handle: str) -> None:
        with self._messages_lock:
            if receipt_handle in self.deleted_messages:
                return  # already deleted: gracefully ignored, as moto does
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
    Queue.attributes = property(LazyAttributes)  # type: ignore[assignment,method-assign]
    Queue.delete_message = delete_message  # type: ignore[method-assign]


def main() -> None:
    patch()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:])


if __name__ == "__main__":
    main()
