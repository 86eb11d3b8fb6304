"""moto's server (5.2.5) with its SQS queue made linear: ``python -m bench.moto_linear -H HOST -p PORT``.

As shipped, every entry of a SendMessage(Batch) and every message a ReceiveMessage returns reads
``Queue.attributes``, which computes all of the queue's attributes, three of them scans of every
message in the queue (``ApproximateNumberOfMessages*``): sending or receiving N messages costs O(N²).
Dispatching 2,000 customers takes 40 s and 100,000 would take about a day; draining 2,000 spends
most of its time there. Here ``Queue.attributes`` is a mapping that computes only what is read.

Also, as shipped, DeleteMessage rebuilds the queue's message list without holding the queue's lock,
so two deletes at once can lose one of them (the message comes back after its visibility timeout,
and a drain that waits for an empty queue waits that long): here DeleteMessage takes that lock.
"""

from __future__ import annotations

import collections.abc
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator


_patched = False


def patch() -> None:
    """Apply both fixes to moto's SQS models in this process (once)."""
    global _patched
    if _patched:
        return
    _patched = True
    from moto.core.utils import camelcase_to_underscores
    from moto.sqs.models import Queue

    class LazyAttributes(collections.abc.Mapping[str, Any]):
        """The same keys and values as ``Queue.attributes``, each computed when read."""

        def __init__(self, queue: Any) -> None:
            self._queue = queue
            keys = list(queue.BASE_ATTRIBUTES)
            if queue.fifo_queue:
                keys += queue.FIFO_ATTRIBUTES
            if queue.kms_master_key_id:
                keys += queue.KMS_ATTRIBUTES
            self._keys = keys

        def __getitem__(self, key: str) -> Any:
            if key not in self._keys:
                raise KeyError(key)
            queue = self._queue
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

    original_delete = Queue.delete_message

    def delete_message(self: Any, receipt_handle: str) -> None:
        with self._messages_lock:
            original_delete(self, receipt_handle)

    Queue.attributes = property(LazyAttributes)  # type: ignore[assignment,method-assign]
    Queue.delete_message = delete_message  # type: ignore[method-assign]


def main() -> None:
    patch()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:])


if __name__ == "__main__":
    main()
