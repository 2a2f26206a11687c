"""Rows into the owner's own table: append and upsert, on the real PostgreSQL and MariaDB; a
replayed batch leaves an upsert table unchanged; values keep their types."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from apps.forwarding import actions
from apps.forwarding.database.models import BatchOutcome, DatabaseBatch
from apps.forwarding.models import Attempt, Delivery, Status
from apps.forwarding.outbox import write_outbox

from ..conftest import deliver_due, make_event
from .conftest import create_readings, events_of, make_db_destination

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def as_json(value):
    return value if isinstance(value, dict) else json.loads(value)


def test_append_writes_one_row_per_event(target_db, alice_owner, alice_meter) -> None:
    create_readings(target_db, append=True)
    destination = make_db_destination(alice_owner, target_db, write_mode="append")
    ts = datetime(2025, 3, 1, 12, 30, 15, 123000, tzinfo=UTC)
    events = [make_event(alice_meter, data={"power": 10.0 + i, "v": i}, ts=ts) for i in range(20)]
    assert write_outbox(events) == 20
    # One outbox row carries the listener batch's 20 events (a pack), not one row each.
    assert Delivery.objects.filter(destination=destination).count() == 1
    deliver_due()

    assert events_of(destination, status=Status.DELIVERED) == 20
    rows = target_db.rows("readings", order="power")
    assert [r[0] for r in rows] == [e.event_id for e in events]
    event_id, device_id, row_ts, power, data = rows[3]
    assert device_id == "alice-meter-1" and power == 13.0
    assert as_json(data) == {"power": 13.0, "v": 3}
    # Stored as the instant it is (MariaDB's DATETIME holds it in UTC).
    assert row_ts.replace(tzinfo=row_ts.tzinfo or UTC) == ts

    destination.refresh_from_db()
    assert destination.delivered_count == 20 and destination.last_success_at is not None
    assert destination.batch_count >= 1
    [batch, *_] = DatabaseBatch.objects.filter(destination=destination).order_by("id")
    assert batch.outcome == BatchOutcome.WRITTEN and batch.written == batch.rows


def test_upsert_updates_the_row_of_a_key(target_db, alice_owner, alice_meter) -> None:
    create_readings(target_db)
    target_db.execute("CREATE TABLE latest (device_id varchar(63) PRIMARY KEY, power float)")
    destination = make_db_destination(
        alice_owner,
        target_db,
        table="latest",
        column_mapping=[["device_id", "${device.id}"], ["power", "${data.power}"]],
        write_mode="upsert",
        key_columns=["device_id"],
    )
    # Three readings of one device in one batch, then one more: the latest value wins.
    write_outbox([make_event(alice_meter, data={"power": p}) for p in (1.0, 2.0, 3.0)])
    deliver_due()
    assert target_db.rows("latest") == [("alice-meter-1", 3.0)]
    write_outbox([make_event(alice_meter, data={"power": 4.0})])
    deliver_due()
    assert target_db.rows("latest") == [("alice-meter-1", 4.0)]
    assert set(
        Delivery.objects.filter(destination=destination).values_list("status", flat=True)
    ) == {Status.DELIVERED}


def test_replaying_an_upsert_batch_leaves_the_table_unchanged(
    target_db, alice_owner, alice_meter
) -> None:
    create_readings(target_db)
    destination = make_db_destination(alice_owner, target_db)  # upsert on event_id
    write_outbox([make_event(alice_meter, data={"power": float(i)}) for i in range(50)])
    deliver_due()
    before = target_db.rows("readings", order="event_id")
    if target_db.engine == "postgres":
        versions = target_db.execute("SELECT event_id, xmin::text FROM readings ORDER BY 1")

    replayed = actions.replay_deliveries(Delivery.objects.filter(destination=destination))
    assert replayed == 50  # events
    deliver_due()
    assert target_db.rows("readings", order="event_id") == before
    if target_db.engine == "postgres":
        # Not even rewritten: the same row versions (the update is skipped when nothing differs).
        assert target_db.execute("SELECT event_id, xmin::text FROM readings ORDER BY 1") == versions
    assert events_of(destination, replays=1, status=Status.DELIVERED) == 50
    # Written rows are logged per batch, not per row (dead letters do get attempt rows).
    assert not Attempt.objects.filter(destination=destination).exists()
    assert DatabaseBatch.objects.filter(destination=destination).count() >= 2


def test_a_constant_and_interpolated_text_are_written(target_db, alice_owner, alice_meter) -> None:
    target_db.execute(
        "CREATE TABLE tagged (event_id varchar(64) PRIMARY KEY, source varchar(20), "
        "label varchar(100), seq bigint, on_flag boolean)"
    )
    make_db_destination(
        alice_owner,
        target_db,
        table="tagged",
        column_mapping=[
            ["event_id", "${id}"],
            ["source", "platform"],
            ["label", "${device.id}/${seq}"],
            ["seq", "${seq}"],
            ["on_flag", "${data.state}"],
        ],
    )
    event = make_event(alice_meter, data={"state": "ON"})
    write_outbox([event])
    deliver_due()
    [(event_id, source, label, seq, on_flag)] = target_db.rows("tagged")
    assert (event_id, source, label, seq) == (
        event.event_id,
        "platform",
        f"alice-meter-1/{event.seq}",
        event.seq,
    )
    assert on_flag in (True, 1)  # Tasmota's "ON" into a boolean column
