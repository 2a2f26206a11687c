"""The outbox on the ingest hot path: same transaction, bulk rows, cheap without destinations,
one kick per batch at most."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from datetime import timezone as timezone_of

import pytest
from django.db import IntegrityError, connection, transaction

from apps.forwarding import tasks
from apps.forwarding.models import Delivery
from apps.forwarding.outbox import message_id, write_outbox

from .conftest import make_event, make_webhook


@pytest.fixture
def kicks(monkeypatch) -> list[dict]:
    sent: list[dict] = []
    monkeypatch.setattr(tasks.drain, "apply_async", lambda **kw: sent.append(kw))
    return sent


def test_an_owner_without_destinations_costs_one_query_then_none(
    alice_lamp, django_assert_num_queries, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks() as callbacks:
        with django_assert_num_queries(1):
            assert write_outbox([make_event(alice_lamp) for _ in range(200)]) == 0
        with django_assert_num_queries(0):  # cached for a few seconds
            assert write_outbox([make_event(alice_lamp) for _ in range(200)]) == 0
    assert callbacks == []  # nothing written, nothing kicked


def test_a_batch_is_written_in_bulk_with_one_kick(
    receiver,
    alice_owner,
    alice_lamp,
    django_assert_max_num_queries,
    django_capture_on_commit_callbacks,
    kicks,
    settings,
) -> None:
    settings.DELIVERY_QUEUE = "delivery-test"
    make_webhook(alice_owner, receiver.url("/a"))
    make_webhook(alice_owner, receiver.url("/b"))
    events = [make_event(alice_lamp) for _ in range(1000)]
    # Batches of 500 rows, or fewer where the backend caps bound parameters (SQLite: 999).
    fields = [f for f in Delivery._meta.concrete_fields if not f.primary_key]
    batch = min(500, connection.ops.bulk_batch_size(fields, events))
    # Routes (2 queries), then 2,000 rows in bulk.
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        django_assert_max_num_queries(2 + math.ceil(2000 / batch)),
    ):
        assert write_outbox(events) == 2000
    assert len(callbacks) == 1
    assert kicks == [{"queue": "delivery-test"}]
    assert Delivery.objects.count() == 2000


def test_kicks_are_coalesced_across_batches(kicks) -> None:
    for _ in range(50):
        tasks.kick()
    assert len(kicks) == 1
    tasks.kick(force=True)
    assert len(kicks) == 2


def test_deliveries_roll_back_with_the_batch(receiver, alice_owner, alice_lamp) -> None:
    make_webhook(alice_owner, receiver.url())
    with pytest.raises(RuntimeError), transaction.atomic():
        write_outbox([make_event(alice_lamp)])
        raise RuntimeError("the listener's batch failed")
    assert Delivery.objects.count() == 0


def test_an_event_is_one_delivery_per_destination_and_a_second_write_is_refused(
    receiver, alice_owner, alice_lamp
) -> None:
    # Event ids are new in the batch that writes them, so the outbox inserts without
    # ON CONFLICT; the constraint remains the guard, and a violation fails the transaction.
    hook = make_webhook(alice_owner, receiver.url())
    event = make_event(alice_lamp)
    write_outbox([event])
    with pytest.raises(IntegrityError), transaction.atomic():
        write_outbox([event])
    delivery = Delivery.objects.get()
    assert delivery.message_id == message_id(hook.pk, event.event_id)


@pytest.mark.parametrize(
    "ts",
    [
        datetime(2026, 11, 23, 2, 25, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 23, 2, 25, 0, tzinfo=UTC),  # no fraction: none written
        datetime(2026, 11, 23, 9, 25, 0, 5, tzinfo=timezone_of(timedelta(hours=7))),
    ],
    ids=["micros", "whole-second", "offset"],
)
@pytest.mark.parametrize("big", [False, True], ids=["orjson", "stdlib"])
def test_event_times_are_written_as_isoformat_writes_them(
    receiver, alice_owner, alice_lamp, ts, big
) -> None:
    make_webhook(alice_owner, receiver.url())
    event = make_event(alice_lamp, data={"big": 2**70} if big else {"small": 1}, ts=ts)
    write_outbox([event])
    stored = Delivery.objects.values_list("payload", flat=True).get()
    assert (stored["ts"], stored["received_at"]) == (
        ts.isoformat(),
        event.received_at.isoformat(),
    )


def test_the_payload_is_stored_as_the_event_carries_it(receiver, alice_owner, alice_lamp) -> None:
    make_webhook(alice_owner, receiver.url())
    # Unicode, nesting, a float, and an integer beyond 64 bits (JSON allows it; orjson does not).
    data = {"power": "ON", "note": "lampu teras ☀", "nested": {"v": [1, 2.5]}, "big": 2**70}
    event = make_event(alice_lamp, data=data)
    write_outbox([event])
    delivery = Delivery.objects.get()
    times = {"ts": event.ts.isoformat(), "received_at": event.received_at.isoformat()}
    assert delivery.payload == {**event.as_payload(), **times}
    assert delivery.payload["data"]["big"] == 2**70
    assert (delivery.event_id, delivery.event_type, delivery.device) == (
        event.event_id,
        event.type,
        event.device_id,
    )
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("pending", 0, "")
    assert delivery.next_attempt_at == delivery.created_at


def test_message_ids_are_per_destination_and_opaque() -> None:
    a, b = message_id(1, "tel_5"), message_id(2, "tel_5")
    assert a != b and a == message_id(1, "tel_5")
    assert a.startswith("msg_") and "tel_5" not in a and len(a) <= 40


def test_each_owner_gets_only_its_own_destinations(
    receiver, alice_owner, charlie_owner, alice_lamp, charlie_lamp
) -> None:
    alice_hook = make_webhook(alice_owner, receiver.url("/alice"))
    charlie_hook = make_webhook(charlie_owner, receiver.url("/charlie"))
    write_outbox([make_event(alice_lamp), make_event(charlie_lamp), make_event(alice_lamp)])
    assert set(Delivery.objects.values_list("destination_id", "owner_id", "device")) == {
        (alice_hook.pk, alice_owner.pk, "alice-lamp-1"),
        (charlie_hook.pk, charlie_owner.pk, "charlie-lamp-1"),
    }
    assert Delivery.objects.filter(destination=alice_hook).count() == 2
