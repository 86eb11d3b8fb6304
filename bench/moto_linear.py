"""moto's server (5.2.5) with its SQS queue made linear: ``python -m bench.moto_linear -H HOST -p PORT``.

As shipped, every entry of a SendMessage(Batch) and every message a ReceiveMessage returns reads
``Queue.attributes``, which computes all of the queue's attributes, three of them scans of every
message in the queue (``ApproximateNumberOfMessages*``): sending or receiving N messages costs O(N²).
Dispatching 2,000 customers takes 40 s and 100,000 would take about a day; draining 2,000 spends
most of its time there. Here ``Queue.attributes`` is a mapping that computes only what is read.

Also billing_local.moto_fixes, the thread-safety fix every local moto server gets (DeleteMessage in
place, under the queue's lock: as shipped it can lose a message that a concurrent ReceiveMessage
moves to the dead-letter queue, or that a concurrent delete is removing).
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
    """Apply the fixes to moto's SQS models in this process (once)."""
    global _patched
    if _patched:
        return
    _patched = True
    from moto.core.utils import camelcase_to_underscores
    from moto.sqs.models import Queue

    from billing_local import moto_fixes

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

    Queue.attributes = property(LazyAttributes)  # type: ignore[assignment,method-assign]
    moto_fixes.patch()


def main() -> None:
    patch()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:])


if __name__ == "__main__":
    main()
