"""One owner's hanging destination never holds up another owner's deliveries, and tasks never
act on another owner's destinations (ids come with their owner)."""

from __future__ import annotations

import statistics
import threading
import time

import pytest
from django.db import connection

from apps.forwarding import pipeline, tasks
from apps.forwarding.models import Delivery, Destination, Status
from apps.forwarding.outbox import write_outbox

from .conftest import make_event, make_webhook
from .receiver import Answer


@pytest.mark.django_db(transaction=True)
def test_a_hanging_destination_does_not_delay_another_owner(
    receiver, alice_owner, charlie_owner, alice_lamp, charlie_lamp
) -> None:
    receiver.script("/hang", Answer(200, delay=30))
    alice_hook = make_webhook(alice_owner, receiver.url("/hang"), timeout=3, max_in_flight=4)
    charlie_hook = make_webhook(charlie_owner, receiver.url("/charlie"))

    drainer = pipeline.Drainer(budget=60.0)

    def drain() -> None:
        try:
            drainer.run()
        finally:
            connection.close()

    thread = threading.Thread(target=drain)
    thread.start()
    # A steady stream for both owners while alice's receiver hangs.
    for _ in range(60):
        write_outbox([make_event(alice_lamp) for _ in range(5)])
        write_outbox([make_event(charlie_lamp) for _ in range(5)])
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while len(receiver.at("/charlie")) < 300 and time.monotonic() < deadline:
        time.sleep(0.1)
    drainer.stop()
    thread.join(60)
    assert not thread.is_alive()

    charlie = {d.message_id: d for d in Delivery.objects.filter(destination=charlie_hook)}
    assert len(charlie) == 300
    assert {d.status for d in charlie.values()} == {Status.DELIVERED}
    latencies = sorted(
        r.at - charlie[r.headers["webhook-id"]].created_at.timestamp()
        for r in receiver.at("/charlie")
    )
    p95 = statistics.quantiles(latencies, n=20)[-1]
    assert p95 < 3.0, f"charlie p95 {p95:.2f} s"

    # Alice's receiver really was hanging: at most her in-flight cap at a time, and a backlog.
    assert 1 <= len(receiver.at("/hang")) <= 4 * 3
    assert Delivery.objects.filter(destination=alice_hook, status=Status.PENDING).count() > 200


def test_a_task_with_another_owners_id_does_nothing(
    receiver, alice_owner, charlie_owner, alice_lamp
) -> None:
    alice_hook = make_webhook(alice_owner, receiver.url())
    tasks.test_destination(charlie_owner.pk, alice_hook.pk)
    assert receiver.requests == []
    assert Destination.objects.get(pk=alice_hook.pk).last_test_at is None
    tasks.test_destination(alice_owner.pk, alice_hook.pk)
    assert len(receiver.requests) == 1
    [ping] = receiver.requests
    assert ping.headers["webhook-id"].startswith("msg_ping_")
    hook = Destination.objects.get(pk=alice_hook.pk)
    assert hook.last_test_ok and hook.last_test_status == 200


def test_a_secret_copied_from_another_row_fails_closed(
    receiver, alice_owner, charlie_owner, alice_lamp, charlie_lamp
) -> None:
    """Ciphertext is bound to its row and owner: pasting charlie's encrypted secret into
    alice's row does not make alice's requests signed with charlie's key — they stop, visibly,
    and nobody else's deliveries are held up."""
    from django.db import connection

    alice_hook = make_webhook(alice_owner, receiver.url("/alice"))
    charlie_hook = make_webhook(charlie_owner, receiver.url("/charlie"))
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE forwarding_webhookdestination SET secret = "
            "(SELECT secret FROM forwarding_webhookdestination WHERE destination_ptr_id = %s) "
            "WHERE destination_ptr_id = %s",
            [charlie_hook.pk, alice_hook.pk],
        )
    write_outbox([make_event(alice_lamp), make_event(charlie_lamp)])
    pipeline.drain(3.0, linger=0.0)
    assert receiver.at("/alice") == []
    assert len(receiver.at("/charlie")) == 1
    assert Delivery.objects.get(destination=alice_hook).status == Status.PENDING
    assert "cannot be read" in Destination.objects.get(pk=alice_hook.pk).last_error
