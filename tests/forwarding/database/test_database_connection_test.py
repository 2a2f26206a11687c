"""Test Connection of database destinations, against the real servers: it names missing columns
and type mismatches, its test row is rolled back, it warns about superusers, DDL rights and TLS
off, stores what it found, and tells owners nothing about the network."""

from __future__ import annotations

import socket

import pytest

from apps.forwarding import actions, egress
from apps.forwarding.database.models import DatabaseDestination

from .conftest import create_readings, make_db_destination
from .proxy import Proxy

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def owner_sees_only_generic(message: str) -> bool:
    """The one text for every network failure, and nothing about addresses or ports."""
    first = message.split(" — Warning:")[0]
    return first == egress.GENERIC_ERROR and "127.0.0.1" not in message and "refused" not in message


def test_it_names_missing_columns_and_type_mismatches(target_db, alice_owner) -> None:
    # No `power` column; device_id and ts of the wrong types.
    target_db.execute(
        "CREATE TABLE readings (event_id varchar(64) PRIMARY KEY, device_id integer, "
        "ts integer, data text)"
    )
    destination = make_db_destination(alice_owner, target_db)
    result = actions.test_destination(destination)
    assert not result.ok
    assert "Missing columns in readings: power." in result.message
    assert "device_id is int" in result.message and "${device.id} gives text" in result.message
    assert "ts is int" in result.message and "${ts} gives a timestamp" in result.message
    destination.refresh_from_db()
    assert destination.last_test_ok is False and destination.last_test_at is not None
    assert destination.last_test_message == result.message[:300]
    assert any("Missing columns" in e for e in destination.test_report["errors"])
    assert target_db.count("readings") == 0


def test_a_fitting_table_gets_a_rolled_back_row_and_stays_empty(target_db, alice_owner) -> None:
    create_readings(target_db)
    destination = make_db_destination(alice_owner, target_db)
    result = actions.test_destination(destination)
    assert result.ok, result.message
    assert "a test row was written and rolled back" in result.message
    assert target_db.count("readings") == 0
    # Root on both servers: everything an owner should not hand the platform.
    report = DatabaseDestination.objects.get(pk=destination.pk).test_report
    warnings = " ".join(report["warnings"])
    assert "TLS is off" in warnings
    assert "superuser" in warnings


def test_the_test_row_meets_the_servers_own_constraints(target_db, alice_owner) -> None:
    create_readings(target_db)
    # The sample reading's power (349.8) breaks a constraint no mapping check can see.
    target_db.execute("ALTER TABLE readings ADD CONSTRAINT small CHECK (power < 100)")
    destination = make_db_destination(alice_owner, target_db)
    result = actions.test_destination(destination)
    assert not result.ok and "The test row was refused" in result.message
    assert target_db.count("readings") == 0


def test_required_columns_and_upsert_keys_are_checked(target_db, alice_owner) -> None:
    target_db.execute(
        "CREATE TABLE readings (event_id varchar(64), device_id varchar(63), ts varchar(40), "
        "power float, data text, site varchar(20) NOT NULL)"
    )
    destination = make_db_destination(alice_owner, target_db)  # upsert on event_id: no key
    result = actions.test_destination(destination)
    assert not result.ok
    assert "Required columns (NOT NULL, no default) are not mapped: site." in result.message
    assert "Upsert needs a primary key or unique index on exactly (event_id)" in result.message


def test_a_least_privilege_account_gets_no_rights_warning(target_db, alice_owner) -> None:
    create_readings(target_db)
    user = f"writer_{target_db.database[-6:]}"
    if target_db.engine == "postgres":
        target_db.execute(f'CREATE ROLE "{user}" LOGIN')
        target_db.execute(f'GRANT SELECT, INSERT, UPDATE ON readings TO "{user}"')
        password = "trusted"
    else:
        password = "writer-pass-1"
        for host in ("127.0.0.1", "localhost"):
            target_db.execute(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'")
            target_db.execute(
                f"GRANT SELECT, INSERT, UPDATE ON `{target_db.database}`.`readings` "
                f"TO '{user}'@'{host}'"
            )
    try:
        destination = make_db_destination(alice_owner, target_db, username=user, password=password)
        result = actions.test_destination(destination)
        assert result.ok, result.message
        report = DatabaseDestination.objects.get(pk=destination.pk).test_report
        assert report["warnings"] == [
            "TLS is off: rows and the password cross the network unencrypted"
        ]
    finally:
        if target_db.engine == "postgres":
            target_db.execute(f'DROP OWNED BY "{user}"')
            target_db.execute(f'DROP ROLE "{user}"')
        else:
            for host in ("127.0.0.1", "localhost"):
                target_db.execute(f"DROP USER '{user}'@'{host}'")


def test_an_unreachable_host_gets_one_generic_text(target_db, alice_owner) -> None:
    create_readings(target_db)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    destination = make_db_destination(alice_owner, target_db, port=closed)
    result = actions.test_destination(destination)
    assert not result.ok and owner_sees_only_generic(result.message)


def test_the_egress_guard_applies_at_connect_time(target_db, alice_owner, settings) -> None:
    """Saved while the operator allowed loopback; then not allowed: no packet is sent, and the
    owner sees the same text as for any unreachable host."""
    create_readings(target_db)
    proxy = Proxy(target_db.host, target_db.port)
    try:
        destination = make_db_destination(alice_owner, target_db, port=proxy.port)
        settings.EGRESS_ALLOW = []
        result = actions.test_destination(destination)
        assert not result.ok and owner_sees_only_generic(result.message)
        assert proxy.connections == 0
    finally:
        proxy.stop()


def test_a_name_that_rebinds_to_loopback_is_refused(
    target_db, alice_owner, settings, monkeypatch
) -> None:
    """DNS rebinding: a public address when saved, loopback when connecting. The address checked
    is the address connected to."""
    create_readings(target_db)
    settings.EGRESS_ALLOW = []
    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1", "127.0.0.1"])

    def rebinding(host: str, port: int | None) -> list[tuple]:
        address = next(answers)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]

    monkeypatch.setattr(egress, "_getaddrinfo", rebinding)
    destination = make_db_destination(alice_owner, target_db, host="rebind.example")
    result = actions.test_destination(destination)
    assert not result.ok and owner_sees_only_generic(result.message)
