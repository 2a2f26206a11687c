"""Database destinations in the admin: alice creates and watches hers (mapping as text, the
CREATE TABLE run only when she ticks it, the password write-only); the Data Delivery tab shows
rows written, batches and the per-batch log; bob looks but cannot act; charlie sees, tests and
changes nothing of alice's — nor can tasks act across owners."""

from __future__ import annotations

import pytest
from django.urls import reverse

from apps.forwarding import tasks
from apps.forwarding.database.models import DatabaseDestination
from apps.forwarding.models import Delivery, Status
from apps.forwarding.outbox import write_outbox

from ..conftest import deliver_due, make_event
from .conftest import create_readings, make_db_destination

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

PASSWORD = "s3cret-Pa55word"


def form_data(owner, db, **overrides) -> dict:
    data = {
        "owner": owner.pk,
        "name": "Alice's warehouse",
        "enabled": "on",
        "engine": db.engine,
        "host": db.host,
        "port": db.port,
        "database_name": db.database,
        "schema": "public" if db.engine == "postgres" else "",
        "username": db.user,
        "password": PASSWORD if db.engine == "postgres" else "",
        "tls_mode": "disable",
        "table": "meter_rows",
        "column_mapping": "event_id = ${id}\ndevice_id = ${device.id}\nts = ${ts}\n"
        "power = ${data.power}\n",
        "write_mode": "upsert",
        "key_columns": "event_id",
        "batch_size": 500,
        "flush_interval_ms": 0,
        "max_attempts": 8,
        "initial_delay": 5,
        "backoff_factor": 6,
        "max_delay": 36000,
        "batches-TOTAL_FORMS": 0,
        "batches-INITIAL_FORMS": 0,
    }
    data.update(overrides)
    return data


def tables(db) -> set[str]:
    if db.engine == "postgres":
        rows = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    else:
        rows = db.execute("SHOW TABLES")
    return {r[0] for r in rows}


def test_the_platform_creates_the_table_only_when_asked(client, alice, alice_owner, target_db):
    client.force_login(alice)
    url = reverse("admin:forwarding_databasedestination_add")
    page = client.get(url).content.decode()
    assert "CREATE TABLE IF NOT EXISTS" in page  # the suggestion is shown

    response = client.post(url, form_data(alice_owner, target_db, name="not asked"))
    assert response.status_code == 302, response.content.decode()[:3000]
    assert "meter_rows" not in tables(target_db)

    response = client.post(url, form_data(alice_owner, target_db, name="asked", create_table="on"))
    assert response.status_code == 302
    assert "meter_rows" in tables(target_db)
    destination = DatabaseDestination.objects.get(name="asked")
    assert destination.column_mapping == [
        ["event_id", "${id}"],
        ["device_id", "${device.id}"],
        ["ts", "${ts}"],
        ["power", "${data.power}"],
    ]
    assert destination.key_columns == ["event_id"]
    # The created table fits the mapping: Test Connection agrees, and rows go in.
    from apps.forwarding import actions

    assert actions.test_destination(destination).ok


def test_the_form_refuses_a_hostile_mapping_and_a_socket_host(
    client, alice, alice_owner, target_db
):
    client.force_login(alice)
    url = reverse("admin:forwarding_databasedestination_add")
    data = form_data(
        alice_owner,
        target_db,
        host="/var/run/postgresql",
        table="meter_rows; DROP TABLE x",
        column_mapping='event_id = ${id}\n"power" = ${data.power}\n',
        key_columns="event_id`",
    )
    html = client.post(url, data).content.decode()
    assert "Give one host name or IP address" in html
    assert "may only hold ASCII letters" in html
    assert not DatabaseDestination.objects.exists()


def test_the_password_is_write_only(client, alice, alice_owner, postgres_db) -> None:
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db, password=PASSWORD)
    client.force_login(alice)
    change = reverse("admin:forwarding_databasedestination_change", args=[destination.pk])
    for url in (change, reverse("admin:owners_owner_change", args=[alice_owner.pk])):
        html = client.get(url).content.decode()
        assert PASSWORD not in html
    # Saving without typing it keeps it.
    data = form_data(alice_owner, postgres_db, table="readings", password="")
    data.pop("owner")
    data["column_mapping"] = destination.mapping_text()
    response = client.post(change, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    destination.refresh_from_db()
    assert destination.password.reveal() == PASSWORD


def test_the_tab_shows_rows_batches_and_the_batch_log(
    client, alice, alice_owner, alice_meter, target_db
) -> None:
    create_readings(target_db)
    destination = make_db_destination(alice_owner, target_db, name="Warehouse")
    write_outbox([make_event(alice_meter, data={"power": float(i)}) for i in range(30)])
    write_outbox([make_event(alice_meter, data={"power": -1.0})])  # one dead letter
    deliver_due()
    client.force_login(alice)
    html = client.get(reverse("admin:owners_owner_change", args=[alice_owner.pk])).content.decode()
    assert "Warehouse" in html and "Database" in html
    assert "30 rows" in html and "batches" in html
    assert 'id="delivery-batches"' in html
    assert "Written, bad rows set aside" in html or "Written" in html
    dead = Delivery.objects.get(destination=destination, status=Status.FAILED)
    assert "Rejected by the database" in html and f'value="{dead.pk}"' in html  # replayable
    change = client.get(
        reverse("admin:forwarding_databasedestination_change", args=[destination.pk])
    ).content.decode()
    assert "recent batches" in change.lower() and "Rows written 30" in change


def test_bob_may_look_but_not_test_or_change(client, bob, alice_owner, postgres_db) -> None:
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db)
    client.force_login(bob)
    change = reverse("admin:forwarding_databasedestination_change", args=[destination.pk])
    assert client.get(change).status_code == 200
    test = reverse("admin:forwarding_databasedestination_test", args=[destination.pk])
    assert client.post(test).status_code == 404
    enabled = reverse("admin:forwarding_databasedestination_enabled", args=[destination.pk])
    assert client.post(enabled, {"enabled": "0"}).status_code == 404
    destination.refresh_from_db()
    assert destination.enabled and destination.last_test_at is None


def test_charlie_never_sees_or_uses_alices_database_destinations(
    client, charlie, charlie_owner, alice_owner, alice_meter, charlie_lamp, postgres_db
) -> None:
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db, name="Alice's warehouse")
    client.force_login(charlie)
    listing = client.get(reverse("admin:forwarding_databasedestination_changelist"))
    assert listing.status_code == 200 and "Alice" not in listing.content.decode()
    for name in ("change", "delete"):
        url = reverse(f"admin:forwarding_databasedestination_{name}", args=[destination.pk])
        assert client.get(url).status_code == 404, name
    for name in ("test", "enabled"):
        url = reverse(f"admin:forwarding_databasedestination_{name}", args=[destination.pk])
        assert client.post(url, {"enabled": "0"}).status_code == 404, name
    # Not even as a target of a test run by id, nor for his own events.
    tasks.test_destination.run(charlie_owner.pk, destination.pk)
    write_outbox([make_event(charlie_lamp, data={"power": 1.0})])
    deliver_due()
    destination.refresh_from_db()
    assert destination.enabled and destination.last_test_at is None
    assert not Delivery.objects.filter(destination=destination).exists()
    assert postgres_db.count("readings") == 0


def test_a_delivery_of_another_owner_is_never_written(
    alice_owner, charlie_owner, alice_meter, postgres_db
) -> None:
    """Defence in depth: even a corrupted outbox row cannot put charlie's event in alice's
    table — the transport checks the owner of every row against the destination's."""
    create_readings(postgres_db)
    destination = make_db_destination(alice_owner, postgres_db)
    kept = make_event(alice_meter, data={"power": 1.0})
    write_outbox([make_event(alice_meter, data={"power": 1.0}) for _ in range(2)])  # a pack
    write_outbox([kept])  # another listener batch: another row
    smuggled = Delivery.objects.filter(destination=destination).order_by("id").first()
    Delivery.objects.filter(pk=smuggled.pk).update(owner=charlie_owner)
    deliver_due()
    smuggled.refresh_from_db()
    assert smuggled.status == Status.FAILED and "not an event of this owner" in smuggled.last_error
    assert smuggled.events == 2  # the whole row, none of its events
    assert [r[0] for r in postgres_db.rows("readings")] == [kept.event_id]
