"""How server errors are sorted (content / destination / transient / network), per engine, and
what that does to a batch: a row lock held past the lock timeout is transient (retried on the
schedule, never "in error"); a dead letter replayed after the owner fixed the table is written."""

from __future__ import annotations

import time

import psycopg
import pymysql
import pytest

from apps.forwarding import actions, egress
from apps.forwarding.database import mysql, postgres
from apps.forwarding.database.base import ErrorClass
from apps.forwarding.models import Delivery, Status
from apps.forwarding.outbox import write_outbox

from ..conftest import deliver_due, make_event
from .conftest import create_readings, make_db_destination


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (psycopg.errors.NotNullViolation("null value in column"), ErrorClass.CONTENT),
        (psycopg.errors.CheckViolation("violates check constraint"), ErrorClass.CONTENT),
        (psycopg.errors.NumericValueOutOfRange("out of range"), ErrorClass.CONTENT),
        (psycopg.errors.InvalidTextRepresentation("invalid input"), ErrorClass.CONTENT),
        (psycopg.errors.UndefinedTable("relation does not exist"), ErrorClass.DESTINATION),
        (psycopg.errors.UndefinedColumn("column does not exist"), ErrorClass.DESTINATION),
        (psycopg.errors.InsufficientPrivilege("permission denied"), ErrorClass.DESTINATION),
        (psycopg.errors.InvalidColumnReference("no unique constraint"), ErrorClass.DESTINATION),
        (psycopg.errors.DeadlockDetected("deadlock detected"), ErrorClass.TRANSIENT),
        (psycopg.errors.SerializationFailure("could not serialize"), ErrorClass.TRANSIENT),
        (psycopg.errors.LockNotAvailable("lock timeout"), ErrorClass.TRANSIENT),
        (psycopg.errors.QueryCanceled("statement timeout"), ErrorClass.TRANSIENT),
        (psycopg.errors.AdminShutdown("terminating connection"), ErrorClass.TRANSIENT),
        (psycopg.errors.TooManyConnections("too many clients"), ErrorClass.TRANSIENT),
        (psycopg.OperationalError("server closed the connection unexpectedly"), ErrorClass.NETWORK),
        (ConnectionResetError(104, "reset"), ErrorClass.NETWORK),
    ],
)
def test_postgres_errors_are_sorted(error, kind) -> None:
    assert postgres.classify(error).kind is kind


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (1048, ErrorClass.CONTENT),  # column cannot be null
        (1406, ErrorClass.CONTENT),  # data too long
        (1366, ErrorClass.CONTENT),  # incorrect value
        (4025, ErrorClass.CONTENT),  # MariaDB CHECK
        (3819, ErrorClass.CONTENT),  # MySQL CHECK
        (1045, ErrorClass.DESTINATION),  # access denied
        (1049, ErrorClass.DESTINATION),  # unknown database
        (1146, ErrorClass.DESTINATION),  # no such table
        (1054, ErrorClass.DESTINATION),  # unknown column
        (1142, ErrorClass.DESTINATION),  # command denied on the table
        (1213, ErrorClass.TRANSIENT),  # deadlock
        (1205, ErrorClass.TRANSIENT),  # lock wait timeout
        (1969, ErrorClass.TRANSIENT),  # statement time exceeded
        (1053, ErrorClass.TRANSIENT),  # server shutdown
        (2006, ErrorClass.NETWORK),  # server has gone away
        (2013, ErrorClass.NETWORK),  # lost connection
    ],
)
def test_mysql_errors_are_sorted(code, kind) -> None:
    error = pymysql.err.OperationalError(code, "message from the server")
    assert mysql.classify(error).kind is kind


def test_network_errors_tell_owners_nothing() -> None:
    for error in (
        postgres.classify(psycopg.OperationalError("connection to 10.1.2.3 refused")),
        mysql.classify(pymysql.err.OperationalError(2003, "Can't connect to '10.1.2.3'")),
    ):
        assert error.message == egress.GENERIC_ERROR


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_row_lock_past_the_lock_timeout_is_retried_not_an_error(
    target_db, alice_owner, alice_meter, monkeypatch
) -> None:
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT", 1)
    monkeypatch.setattr(mysql, "LOCK_TIMEOUT", 1)
    create_readings(target_db)
    destination = make_db_destination(
        alice_owner, target_db, initial_delay=1, backoff_factor=1.0, max_delay=1
    )
    event = make_event(alice_meter, data={"power": 2.0})
    # The owner's own job holds the row this upsert must update.
    holder = target_db.connect()
    ts = "2025-01-01 00:00:00"
    values = (event.event_id, "x", ts, 1.0)
    insert = "INSERT INTO readings (event_id, device_id, ts, power) VALUES (%s, %s, %s, %s)"
    if target_db.engine == "postgres":
        holder.execute(insert, values)
        holder.autocommit = False
        holder.execute("SELECT 1 FROM readings FOR UPDATE")
    else:
        with holder.cursor() as cur:
            cur.execute(insert, values)
            holder.autocommit(False)
            cur.execute("SELECT 1 FROM readings FOR UPDATE")
    write_outbox([event])
    deliver_due()
    delivery = Delivery.objects.get(destination=destination)
    assert delivery.status == Status.PENDING and delivery.attempts == 1
    destination.refresh_from_db()
    assert destination.failure_streak == 1 and destination.error_reason == ""
    holder.rollback()  # the job ends
    time.sleep(1.2)  # the back-off step
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=delivery.created_at)
    deliver_due()
    delivery.refresh_from_db()
    assert delivery.status == Status.DELIVERED
    assert [r[3] for r in target_db.rows("readings")] == [2.0]


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_dead_letter_replayed_after_the_fix_is_written(
    target_db, alice_owner, alice_meter
) -> None:
    create_readings(target_db)
    destination = make_db_destination(alice_owner, target_db)
    write_outbox([make_event(alice_meter, data={"power": -3.0})])  # breaks CHECK (power >= 0)
    deliver_due()
    dead = Delivery.objects.get(destination=destination)
    assert dead.status == Status.FAILED
    # The owner decides negative readings are fine after all.
    if target_db.engine == "postgres":
        target_db.execute("ALTER TABLE readings DROP CONSTRAINT readings_power_check")
    else:  # MariaDB keeps a column's CHECK in the column definition
        target_db.execute("ALTER TABLE readings MODIFY power double")
    assert actions.replay_deliveries(Delivery.objects.filter(pk=dead.pk)) == 1
    deliver_due()
    dead.refresh_from_db()
    assert dead.status == Status.DELIVERED and dead.replays == 1
    assert [r[3] for r in target_db.rows("readings")] == [-3.0]
