"""How database sinks hold their rows on PostgreSQL: by row locks for the length of one batch,
not by a lease written to the row. Other workers skip locked rows; a worker that dies (its
transaction rolls back) leaves its rows due again at once, untouched; a delivered row was
updated once, with its attempt counted. And a real worker killed mid-burst loses nothing."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pytest
from django.db import connection, transaction

from apps.forwarding import claims
from apps.forwarding.database.models import DatabaseBatch
from apps.forwarding.models import Delivery, Status
from apps.forwarding.outbox import write_outbox

from ..conftest import deliver_due, make_event
from ..worker import Worker, wait_all_delivered, wait_for
from .conftest import create_readings, make_db_destination

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _postgres_platform() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row-lock claims are PostgreSQL's; elsewhere sinks lease rows (tested too)")


def test_locked_rows_are_skipped_by_others_and_due_again_when_the_holder_dies(
    postgres_db, alice_owner, alice_meter
) -> None:
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db)
    write_outbox([make_event(alice_meter) for _ in range(10)])
    ids = list(Delivery.objects.order_by("id").values_list("id", flat=True))
    held: list[int] = []
    locked, release = threading.Event(), threading.Event()

    def holder() -> None:
        try:
            with transaction.atomic():
                held.extend(r.id for r in claims.lock_due(destination.pk, 4))
                locked.set()
                release.wait(10)
                raise RuntimeError("the worker dies before recording anything")
        except RuntimeError:
            pass
        finally:
            connection.close()

    thread = threading.Thread(target=holder)
    thread.start()
    assert locked.wait(10)
    assert held == ids[:4]  # oldest first
    with transaction.atomic():
        others = claims.lock_due(destination.pk, 100)
    assert [r.id for r in others] == ids[4:]  # the held rows are skipped, not waited for
    assert all(r.attempt == 1 for r in others)
    release.set()
    thread.join(10)

    # Nothing was written to the rows: no lease to expire, due again at once, attempt uncounted.
    rows = Delivery.objects.filter(id__in=held)
    assert {(r.status, r.attempts, r.lease_token) for r in rows} == {(Status.PENDING, 0, None)}
    with transaction.atomic():
        assert [r.id for r in claims.lock_due(destination.pk, 100)] == ids


def test_a_delivered_row_has_its_attempt_counted_and_no_lease(
    postgres_db, alice_owner, alice_meter
) -> None:
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db, batch_size=7)
    write_outbox([make_event(alice_meter) for _ in range(20)])
    # The listener batch's events go in rows of at most the destination's batch size.
    rows = Delivery.objects.filter(destination=destination).order_by("id")
    assert [r.events for r in rows] == [7, 7, 6]
    assert [len(r.payload) for r in rows] == [7, 7, 6]
    stats = deliver_due()

    assert stats.delivered == 20 and stats.claimed == 20
    assert postgres_db.count("readings") == 20
    rows = Delivery.objects.filter(destination=destination)
    assert {(r.status, r.attempts, r.lease_token) for r in rows} == {(Status.DELIVERED, 1, None)}
    assert all(r.last_attempt_at and r.delivered_at for r in rows)
    assert sorted(DatabaseBatch.objects.values_list("rows", flat=True)) == [6, 7, 7]
    destination.refresh_from_db()
    # Events delivered; attempts are per row (one write of each batch).
    assert (destination.delivered_count, destination.attempt_count) == (20, 3)


EVENTS = 3000


def test_killing_a_worker_mid_burst_loses_no_row(
    postgres_db, alice_owner, alice_meter, tmp_path, settings
) -> None:
    """Append mode, so that a repeat would show: rows whose batch was committed in the owner's
    database but not yet recorded (the kill in between) are written again — at-least-once —
    and nothing is lost."""
    queue = f"db-crash-{uuid.uuid4().hex[:8]}"
    settings.DELIVERY_QUEUE = queue
    create_readings(postgres_db, append=True)
    make_db_destination(
        alice_owner, postgres_db, write_mode="append", batch_size=25, flush_interval_ms=0
    )
    events = [make_event(alice_meter) for _ in range(EVENTS)]
    for start in range(0, EVENTS, 500):
        write_outbox(events[start : start + 500])

    log = tmp_path / "worker.log"
    worker = Worker(queue, log)
    try:
        worker.start()
        wait_for(lambda: postgres_db.count("readings") >= 300, 60, "the burst to start", log)
        worker.kill()
        assert postgres_db.count("readings") < EVENTS, "the burst ended before the kill"
        # No row was left marked as being sent: nothing waits for a lease to expire.
        assert not Delivery.objects.filter(status=Status.SENDING).exists()

        worker.start()
        wait_all_delivered(EVENTS, log)
    finally:
        worker.stop()

    written = Counter(row[0] for row in postgres_db.execute("SELECT event_id FROM readings"))
    assert set(written) == {e.event_id for e in events}  # nothing lost, nothing foreign
    repeated = sum(n - 1 for n in written.values())
    # At most the batches in flight at the kill: two processes, one batch each.
    assert repeated <= 2 * 25, repeated
