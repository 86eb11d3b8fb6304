"""A thread-safety fix to moto's SQS (5.2.5), applied to every moto server the local stack runs.

moto's server handles requests on threads. As shipped, ``Queue.delete_message`` rebuilds the queue's
message list without the queue's lock, while ``ReceiveMessage`` moves a message that reached
``maxReceiveCount`` to the dead-letter queue with an in-place ``list.remove`` on that same list. When
the two interleave, the rebuild's iteration skips the element after the removed one and the new list
loses it: a message vanishes from both queues (seen as customer-hours never billed in bench/chaos,
whose outage dead-letters messages while the runner deletes others). Two concurrent deletes can
likewise lose one of theirs. Real SQS does neither.

Here DeleteMessage removes the message in place, under the queue's lock: never a rebuild, so an
in-place removal by a concurrent receive cannot make it drop another message.

``python -m billing_local.moto_fixes -H HOST -p PORT`` runs moto's server with the fix.
"""

from __future__ import annotations

import sys
from typing import Any

_patched = False


def patch() -> None:
    """Apply the fix to moto's SQS models in this process (once)."""
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

    Queue.delete_message = delete_message  # type: ignore[method-assign]


def main() -> None:
    patch()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:])


if __name__ == "__main__":
    main()
