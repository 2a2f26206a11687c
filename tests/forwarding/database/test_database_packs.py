"""Packs: a database destination's outbox row carries a listener batch's events (outbox.py), and
an event that fares differently from the rest of its pack is split out into a row of its own."""

from __future__ import annotations

import types

import pytest

from apps.devices.models import Device, Profile
from apps.forwarding import actions, ratelimit
from apps.forwarding.claims import Claimed
from apps.forwarding.database.transport import _unpack, _within
from apps.forwarding.models import Attempt, Delivery, Outcome, Status, WebhookDestination
from apps.forwarding.outbox import forget_routes, message_id, pack_event_id, write_outbox
from apps.forwarding.stats import figures

from ..conftest import deliver_due, make_event
from .conftest import create_readings, events_of, make_db_destination

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def claimed(row_id: int, events: int) -> Claimed:
    payload = [{"id": f"tel_{row_id}_{i}"} for i in range(events)]
    return Claimed(row_id, 1, 1, "m", "e", "telemetry", payload, 1, events)


def test_a_listener_batch_is_one_row_per_database_destination_and_one_per_event_for_webhooks(
    postgres_db, alice_owner, alice_meter
) -> None:
    create_readings(postgres_db)
    database = make_db_destination(alice_owner, postgres_db)
    hook = WebhookDestination.objects.create(
        owner=alice_owner, name="crm", url="https://example.com/hook"
    )
    forget_routes()
    events = [make_event(alice_meter) for _ in range(5)]

    assert write_outbox(events) == 10  # events, for both destinations

    assert Delivery.objects.filter(destination=hook).count() == 5
    [pack] = Delivery.objects.filter(destination=database)
    assert pack.events == 5
    assert [p["id"] for p in pack.payload] == [e.event_id for e in events]
    assert pack.event_id == f"{events[0].event_id}+4" == pack_event_id(events[0].event_id, 5)
    assert pack.message_id == message_id(database.pk, pack.event_id)
    assert (pack.event_type, pack.device) == ("telemetry", "alice-meter-1")


def test_a_pack_of_several_devices_and_types_names_neither(
    postgres_db, alice_owner, alice_meter
) -> None:
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db)
    other = Device.objects.create(
        owner=alice_owner, device_id="alice-meter-2", name="AC", profile=Profile.METER_V2
    )
    write_outbox([make_event(alice_meter), make_event(other, type="status")])
    [pack] = Delivery.objects.filter(destination=destination)
    assert (pack.events, pack.event_type, pack.device) == (2, "batch", "")


def test_a_single_event_row_keeps_the_events_own_id(postgres_db, alice_owner, alice_meter) -> None:
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db)
    event = make_event(alice_meter)
    write_outbox([event])
    [row] = Delivery.objects.filter(destination=destination)
    assert (row.event_id, row.events) == (event.event_id, 1)


def test_a_refused_event_is_split_out_of_its_pack_and_replayed_on_its_own(
    postgres_db, alice_owner, alice_meter
) -> None:
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db)
    events = [make_event(alice_meter, data={"power": float(i)}) for i in range(10)]
    poison = events[4] = make_event(alice_meter, data={"power": -1.0})  # breaks CHECK (>= 0)
    write_outbox(events)
    [pack] = Delivery.objects.filter(destination=destination)

    deliver_due()

    assert postgres_db.count("readings") == 9
    pack.refresh_from_db()
    assert (pack.status, pack.events, len(pack.payload)) == (Status.DELIVERED, 9, 9)
    assert poison.event_id not in {p["id"] for p in pack.payload}
    dead = Delivery.objects.get(destination=destination, status=Status.FAILED)
    assert (dead.event_id, dead.events, dead.attempts) == (poison.event_id, 1, 1)
    assert dead.payload["id"] == poison.event_id and dead.device == "alice-meter-1"
    assert dead.message_id == message_id(destination.pk, poison.event_id)
    assert "Rejected by the database" in dead.last_error
    # Only the dead letter has an attempt row; the pack's written events are in the batch log.
    [attempt] = Attempt.objects.filter(destination=destination)
    assert attempt.delivery_id == dead.pk and attempt.outcome == Outcome.FAILED
    destination.refresh_from_db()
    assert (destination.delivered_count, destination.failed_count) == (9, 1)

    # The owner relaxes the constraint and replays the dead letter: it alone is written.
    postgres_db.execute("ALTER TABLE readings DROP CONSTRAINT readings_power_check")
    assert actions.replay_deliveries(Delivery.objects.filter(pk=dead.pk)) == 1
    deliver_due()
    dead.refresh_from_db()
    assert dead.status == Status.DELIVERED
    assert postgres_db.count("readings") == 10
    assert events_of(destination, status=Status.DELIVERED) == 10


def test_backlog_and_replay_count_events_not_rows(postgres_db, alice_owner, alice_meter) -> None:
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db, batch_size=4)
    destination.enabled = False
    destination.save()
    forget_routes()
    write_outbox([make_event(alice_meter) for _ in range(10)])  # nothing: disabled
    destination.enabled = True
    destination.save()
    forget_routes()
    write_outbox([make_event(alice_meter) for _ in range(10)])  # packs of 4, 4, 2

    assert Delivery.objects.filter(destination=destination).count() == 3
    assert figures([destination])[destination.pk].backlog == 10
    deliver_due()
    assert postgres_db.count("readings") == 10
    assert (
        actions.replay_range(Delivery.objects.filter(destination=destination), None, None, True)
        == 10
    )


def test_a_claim_takes_whole_rows_up_to_the_batch_size() -> None:
    rows = [claimed(1, 4), claimed(2, 4), claimed(3, 4)]
    assert [r.id for r in _within(rows, 8)] == [1, 2]
    assert [r.id for r in _within(rows, 7)] == [1]
    assert [r.id for r in _within(rows, 100)] == [1, 2, 3]
    # A first row larger than the limit still goes (a pack is never cut).
    assert [r.id for r in _within([claimed(9, 50)], 10)] == [9]


def test_unpacking_keeps_each_rows_slice_of_events() -> None:
    single = Claimed(7, 1, 1, "m", "tel_7", "telemetry", {"id": "tel_7"}, 1)
    items, spans = _unpack([claimed(1, 3), single, claimed(2, 2)])
    assert spans == [(0, 3), (3, 4), (4, 6)]
    assert [i.id for i in items] == [1, 1, 1, 7, 2, 2]
    assert items[3].payload == {"id": "tel_7"}


def test_the_replay_command_counts_events_dry_or_not(postgres_db, alice_owner, alice_meter) -> None:
    from io import StringIO

    from django.core.management import call_command

    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db)
    write_outbox([make_event(alice_meter) for _ in range(6)])
    deliver_due()
    args = ["replay_deliveries", "--owner", "alice", "--destination", str(destination.pk)]

    out = StringIO()
    call_command(*args, "--include-delivered", "--dry-run", stdout=out)
    assert out.getvalue().strip() == "would replay 6 deliveries of alice"
    out = StringIO()
    call_command(*args, "--include-delivered", stdout=out)
    assert "replaying 6 deliveries of alice" in out.getvalue()
    assert events_of(destination, status=Status.PENDING) == 6


def test_a_rate_limited_destination_gets_packs_of_at_most_its_limit_and_waits_for_room(
    postgres_db, alice_owner, alice_meter, monkeypatch
) -> None:
    # The limiter's one-second windows follow this clock, so a slow claim cannot slip into the
    # next second's room (it did once in CI, writing a pack the test expected held back).
    clock = [1_900_000_000.0]
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: clock[0]))

    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db, rate_limit=5, batch_size=100)
    write_outbox([make_event(alice_meter) for _ in range(12)])
    rows = Delivery.objects.filter(destination=destination).order_by("id")
    # A pack is written whole, so it is never more than one second of the limit.
    assert [r.events for r in rows] == [5, 5, 2]

    ratelimit.take(f"d{destination.pk}", 3, 5)  # 2 of this second's 5 are left
    deliver_due(budget=0.2)
    # The next pack (5 events) does not fit in what is left of the second: nothing was taken.
    assert postgres_db.count("readings") == 0
    assert events_of(destination, status=Status.PENDING) == 12

    written = []
    for _second in range(3):  # a pack per second's room
        clock[0] += 1
        deliver_due(budget=0.5)
        written.append(postgres_db.count("readings"))
    assert written == [5, 10, 12]
    assert events_of(destination, status=Status.PENDING) == 0
