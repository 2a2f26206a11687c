"""How database destinations fail (issue 4, "Failures"), against the real servers: bad rows are
isolated and set aside while the rest is written; an unreachable database keeps its backlog and
drains it, nothing lost, once it is back; a login or table problem puts the destination in error,
alerts the owner once, and costs one connection attempt per back-off step — no retry storm."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from apps.forwarding import egress, kinds, pipeline
from apps.forwarding.database.models import BatchOutcome, DatabaseBatch
from apps.forwarding.models import AlertKind, Attempt, Delivery, DeliveryAlert, Status
from apps.forwarding.outbox import write_outbox

from ..conftest import deliver_due, make_event
from .conftest import create_readings, events_of, make_db_destination
from .proxy import Proxy

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def statuses(destination) -> dict[str, int]:
    """Events by status (a row carries a batch of events)."""
    counts: dict[str, int] = {}
    rows = Delivery.objects.filter(destination=destination).values_list("status", "events")
    for status, events in rows:
        counts[status] = counts.get(status, 0) + events
    return counts


def drain_until_done(destination, timeout: float = 30.0) -> None:
    """Run the pipeline until nothing of `destination` is pending (pauses included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliver_due()
        if not Delivery.objects.filter(
            destination=destination, status__in=[Status.PENDING, Status.SENDING]
        ).exists():
            return
        time.sleep(0.2)
    raise AssertionError(f"still pending after {timeout} s: {statuses(destination)}")


def test_a_poison_row_among_1000_is_isolated_and_999_are_written(
    target_db, alice_owner, alice_meter
) -> None:
    create_readings(target_db)
    destination = make_db_destination(alice_owner, target_db, batch_size=1000)
    events = [make_event(alice_meter, data={"power": float(i)}) for i in range(1000)]
    poison = make_event(alice_meter, data={"power": -5.0})  # breaks CHECK (power >= 0)
    events[637] = poison
    write_outbox(events)
    deliver_due()

    assert target_db.count("readings") == 999
    assert not target_db.execute("SELECT 1 FROM readings WHERE event_id = %s", (poison.event_id,))
    dead = Delivery.objects.get(destination=destination, status=Status.FAILED)
    assert dead.event_id == poison.event_id
    assert "Rejected by the database" in dead.last_error
    assert "power" in dead.last_error.lower() or "check" in dead.last_error.lower()
    assert statuses(destination) == {Status.DELIVERED: 999, Status.FAILED: 1}
    [batch] = DatabaseBatch.objects.filter(destination=destination)
    assert batch.outcome == BatchOutcome.PARTIAL and batch.rows == 1000
    assert (batch.written, batch.rejected) == (999, 1)
    assert batch.statements <= 2 * 10 + 1  # a bisection, not a row-by-row retry
    destination.refresh_from_db()
    assert not destination.error_reason and destination.failure_streak == 0


def test_a_value_that_cannot_fit_its_column_is_set_aside_before_sending(
    target_db, alice_owner, alice_meter
) -> None:
    create_readings(target_db)
    destination = make_db_destination(alice_owner, target_db)
    good = make_event(alice_meter, data={"power": 1.5})
    bad = make_event(alice_meter, data={"power": {"nested": True}})
    write_outbox([good, bad])
    deliver_due()
    assert [r[0] for r in target_db.rows("readings")] == [good.event_id]
    dead = Delivery.objects.get(destination=destination, event_id=bad.event_id)
    assert dead.status == Status.FAILED and dead.last_error.startswith("Column power:")


def test_an_unreachable_database_keeps_its_backlog_and_drains_it_when_back(
    target_db, alice_owner, alice_meter
) -> None:
    create_readings(target_db)
    proxy = Proxy(target_db.host, target_db.port)
    try:
        destination = make_db_destination(
            alice_owner,
            target_db,
            port=proxy.port,
            initial_delay=1,
            backoff_factor=1.0,
            max_delay=1,
            max_attempts=15,
        )
        write_outbox([make_event(alice_meter, data={"power": 1.0}) for _ in range(100)])
        deliver_due()
        assert target_db.count("readings") == 100

        proxy.stop()  # the owner's server goes away
        backlog = []
        for _round in range(3):
            write_outbox([make_event(alice_meter, data={"power": 2.0}) for _ in range(150)])
            deliver_due()
            backlog.append(events_of(destination, status=Status.PENDING))
            time.sleep(1.1)
        assert backlog == sorted(backlog) and backlog[-1] == 450  # it grows, nothing is lost
        destination.refresh_from_db()
        assert destination.failure_streak >= 1 and not destination.error_reason
        assert destination.last_error.endswith(egress.GENERIC_ERROR)  # no network details
        assert not Delivery.objects.filter(destination=destination, status=Status.FAILED).exists()

        proxy.start()  # back, on the same address
        drain_until_done(destination)
        assert statuses(destination) == {Status.DELIVERED: 550}
        assert target_db.count("readings") == 550  # each event exactly once (event_id key)
        destination.refresh_from_db()
        assert destination.failure_streak == 0 and destination.paused_until is None
    finally:
        proxy.stop()


@pytest.fixture
def dropped_users(target_db):
    """MariaDB accounts a test creates, dropped afterwards (they outlive the test database)."""
    users: list[str] = []
    yield users
    for user in users:
        for host in ("127.0.0.1", "localhost"):
            target_db.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")


def _failing_login_destination(target_db, alice_owner, proxy, users):
    if target_db.engine == "mysql":
        user = f"u{time.monotonic_ns() % 10**9}"
        users.append(user)
        for host in ("127.0.0.1", "localhost"):
            target_db.execute(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY 'right-password'")
            target_db.execute(
                f"GRANT INSERT, UPDATE ON `{target_db.database}`.* TO '{user}'@'{host}'"
            )
        fields = {"username": user, "password": "wrong-password"}
    else:
        # Loopback is `trust` on this machine's PostgreSQL: no password is ever checked, so the
        # login is refused the way a deleted account is (the owner sees the same text).
        fields = {"username": "no_such_role", "password": "wrong-password"}
    return make_db_destination(
        alice_owner,
        target_db,
        port=proxy.port,
        initial_delay=2,
        backoff_factor=2.0,
        max_delay=60,
        **fields,
    )


def test_a_refused_login_puts_the_destination_in_error_without_a_retry_storm(
    target_db, alice_owner, alice_meter, caplog, dropped_users
) -> None:
    caplog.set_level("DEBUG")
    create_readings(target_db)
    proxy = Proxy(target_db.host, target_db.port)  # counts connection attempts
    try:
        destination = _failing_login_destination(target_db, alice_owner, proxy, dropped_users)
        drainer = pipeline.Drainer(budget=60.0, linger=60.0)

        def run() -> None:
            try:
                drainer.run()
            finally:
                connection.close()

        thread = threading.Thread(target=run)
        started = time.monotonic()
        thread.start()
        # A steady stream of readings for 9 s: without the destination-level back-off, every
        # batch would be a login attempt (dozens of them).
        while time.monotonic() - started < 9:
            write_outbox([make_event(alice_meter, data={"power": 1.0}) for _ in range(10)])
            time.sleep(0.1)
        drainer.stop()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        proxy.stop()

    # Pauses of 2, 4, 8 s (±10%): attempts at ~0, ~2, ~6 s, and none before the next at ~14 s.
    assert proxy.connections <= 3, proxy.connections
    assert proxy.connections >= 2  # it does keep probing
    destination.refresh_from_db()
    assert destination.error_reason == "The database refused the login (user or password)."
    assert destination.failure_streak == proxy.connections and destination.enabled
    [alert] = DeliveryAlert.objects.filter(destination=destination)
    assert alert.kind == AlertKind.FAILING and "refused the login" in alert.message
    # After the first batch, each probe is one outbox row (one listener batch of 10 events):
    # 400+ events were never used to knock.
    probes = DatabaseBatch.objects.filter(destination=destination).order_by("id")[1:]
    assert [b.rows for b in probes] == [10] * len(probes)
    assert all(b.outcome == BatchOutcome.ERROR for b in probes)
    assert not Delivery.objects.filter(destination=destination, status=Status.FAILED).exists()
    assert events_of(destination, status=Status.PENDING) > 400
    # The password never travels further than the connect call.
    assert "wrong-password" not in str(Attempt.objects.values_list("error", flat=True))
    assert caplog.records and "wrong-password" not in caplog.text


def test_a_missing_table_is_an_error_until_it_is_created(
    target_db, alice_owner, alice_meter
) -> None:
    destination = make_db_destination(
        alice_owner, target_db, initial_delay=1, backoff_factor=1.0, max_delay=1
    )
    write_outbox([make_event(alice_meter, data={"power": 3.0}) for _ in range(5)])
    deliver_due()
    destination.refresh_from_db()
    assert "readings does not exist" in destination.error_reason
    assert DeliveryAlert.objects.filter(destination=destination).count() == 1

    create_readings(target_db)  # the owner fixes it
    time.sleep(1.2)
    drain_until_done(destination)
    assert target_db.count("readings") == 5
    destination.refresh_from_db()
    assert destination.error_reason == "" and destination.failure_streak == 0


def test_a_mapping_that_no_longer_fits_is_an_error_naming_the_column(
    target_db, alice_owner, alice_meter
) -> None:
    create_readings(target_db)
    destination = make_db_destination(alice_owner, target_db)
    write_outbox([make_event(alice_meter, data={"power": 3.0})])
    deliver_due()
    target_db.execute("ALTER TABLE readings DROP COLUMN power")
    kinds.transport("database").close()  # a new connection looks at the table again
    write_outbox([make_event(alice_meter, data={"power": 4.0})])
    deliver_due()
    destination.refresh_from_db()
    assert destination.error_reason == "Mapped columns missing from readings: power."
    assert Delivery.objects.filter(destination=destination, status=Status.PENDING).count() == 1
