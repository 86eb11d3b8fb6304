"""billing_local.moto_fixes: moto's DeleteMessage no longer loses a message a concurrent receive moves.

Drives moto's SQS models in-process (no server): the concurrent ReceiveMessage thread is simulated
deterministically, by removing a message in place at the moment the delete's scan looks at it, which
is what moto's ReceiveMessage does (without the queue's lock) when it moves a message to the
dead-letter queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from moto import mock_aws
from moto.sqs.models import Queue, sqs_backends

from billing_local import moto_fixes

ACCOUNT, REGION = "123456789012", "us-east-1"


@pytest.fixture
def queue() -> Iterator[Any]:
    with mock_aws():
        backend = sqs_backends[ACCOUNT][REGION]
        backend.create_queue("q")
        for body in ("a", "b", "c"):
            backend.send_message("q", body)
        for _ in range(3):
            backend.receive_message("q", count=1, wait_seconds_timeout=0, visibility_timeout=300)
        yield backend.get_queue("q")


def delete_c_while_a_is_dead_lettered(queue: Any, at_look: int) -> None:
    """Delete c; a concurrent receive moves a to the dead-letter queue when the delete looks at a for
    the ``at_look``-th time."""
    a, _, c = queue._messages
    scanned = a.had_receipt_handle
    looks = 0

    def moved_to_the_dlq_meanwhile(handle: str) -> bool:  # what a concurrent receive does, unlocked
        nonlocal looks
        looks += 1
        if looks == at_look:
            queue._messages.remove(a)
        return bool(scanned(handle))

    a.had_receipt_handle = moved_to_the_dlq_meanwhile
    queue.delete_message(c.receipt_handle)


def test_moto_as_shipped_loses_the_message_after_one_moved_to_the_dead_letter_queue(
    queue: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the shipped method, in case this process already applied the fix)
    monkeypatch.setattr(Queue, "delete_message", _SHIPPED_DELETE)
    # (its first look checks the handle exists; the second, while it rebuilds the list, loses b)
    delete_c_while_a_is_dead_lettered(queue, at_look=2)
    # b vanished (and a, already in the dead-letter queue, is back in the list): the reason for the fix
    assert [m.body for m in queue._messages] == ["a"]


@pytest.mark.parametrize("at_look", [1, 2])
def test_with_the_fix_only_the_deleted_message_goes(queue: Any, at_look: int) -> None:
    moto_fixes.patch()
    delete_c_while_a_is_dead_lettered(queue, at_look)
    assert "b" in [m.body for m in queue._messages]
    assert "c" not in [m.body for m in queue._messages]


_SHIPPED_DELETE = Queue.delete_message


SCANNING = (
    "approximate_number_of_messages",
    "approximate_number_of_messages_not_visible",
    "approximate_number_of_messages_delayed",
)


def scans_per_send(depth: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many scans of the whole queue one SendMessage makes once ``depth`` messages are queued."""
    scans = 0
    for name in SCANNING:
        shipped = getattr(Queue, name)

        def counted(self: Any, shipped: Any = shipped) -> Any:
            nonlocal scans
            scans += 1
            return shipped.fget(self)

        monkeypatch.setattr(Queue, name, property(counted))
    with mock_aws():
        backend = sqs_backends[ACCOUNT][REGION]
        backend.create_queue("deep")
        for i in range(depth):
            backend.send_message("deep", f"m{i}")
        scans = 0
        backend.send_message("deep", "one more")
        return scans


def test_moto_as_shipped_scans_the_whole_queue_on_every_send(monkeypatch: pytest.MonkeyPatch) -> None:
    moto_fixes.patch()
    monkeypatch.setattr(Queue, "attributes", moto_fixes.SHIPPED["attributes"])
    # each scan reads every queued message: a send costs O(queue depth) (the reason for the fix)
    assert scans_per_send(50, monkeypatch) > 0


def test_with_the_fix_a_send_scans_nothing_whatever_the_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    moto_fixes.patch()
    assert scans_per_send(0, monkeypatch) == 0
    assert scans_per_send(500, monkeypatch) == 0


def test_the_fixed_attributes_equal_motos_own(monkeypatch: pytest.MonkeyPatch) -> None:
    moto_fixes.patch()
    with mock_aws():
        backend = sqs_backends[ACCOUNT][REGION]
        backend.create_queue("dlq")
        dlq_arn = backend.get_queue("dlq").queue_arn
        redrive = f'{{"deadLetterTargetArn": "{dlq_arn}", "maxReceiveCount": "5"}}'
        backend.create_queue("q2", RedrivePolicy=redrive, VisibilityTimeout="60")
        backend.send_message("q2", "x")
        queue = backend.get_queue("q2")
        lazy = dict(queue.attributes)
        shipped = moto_fixes.SHIPPED["attributes"].fget(queue)
        assert lazy == shipped
