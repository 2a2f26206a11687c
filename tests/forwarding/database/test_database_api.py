"""Database destinations through the REST API (the kind's own resource, generated from the
model): alice creates one, the password is write-only, Test Connection reports by name;
charlie's key finds nothing of hers."""

from __future__ import annotations

import pytest

from apps.api.actions import create_api_key
from apps.api.models import ALL_SCOPES
from apps.forwarding.database.models import DatabaseDestination
from tests.api.conftest import ApiClient

from .conftest import create_readings

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

PASSWORD = "api-s3cret-pw"


def api_for(owner, user) -> ApiClient:
    return ApiClient(create_api_key(owner, "integration", ALL_SCOPES, created_by=user)[1])


def test_alice_creates_tests_and_charlie_sees_nothing(
    alice, alice_owner, charlie, charlie_owner, postgres_db
) -> None:
    create_readings(postgres_db)
    alice_api = api_for(alice_owner, alice)
    created = alice_api.post(
        "/api/v1/destinations/database/",
        {
            "name": "warehouse",
            "engine": "postgres",
            "host": postgres_db.host,
            "port": postgres_db.port,
            "database_name": postgres_db.database,
            "username": postgres_db.user,
            "password": PASSWORD,
            "tls_mode": "disable",
            "table": "readings",
            "column_mapping": [["event_id", "${id}"], ["device_id", "${device.id}"],
                               ["ts", "${ts}"], ["power", "${data.power}"], ["site", "north"]],
            "write_mode": "upsert",
            "key_columns": ["event_id"],
        },
    )  # fmt: skip
    assert created.status_code == 201, created.content
    assert PASSWORD not in created.content.decode()
    body = created.json()
    destination = DatabaseDestination.objects.get(uuid=body["id"])
    assert destination.password.reveal() == PASSWORD

    tested = alice_api.post(f"/api/v1/destinations/{body['id']}/test/")
    assert tested.status_code == 200, tested.content
    assert tested.json()["ok"] is False
    assert "Missing columns in readings: site." in tested.json()["message"]

    hostile = alice_api.post(
        "/api/v1/destinations/database/",
        {**{k: v for k, v in body.items() if k in ("engine", "host", "port", "username")},
         "name": "x", "database_name": postgres_db.database, "table": 'readings"; --',
         "column_mapping": [["event_id", "${id}"]], "write_mode": "append", "key_columns": []},
    )  # fmt: skip
    assert hostile.status_code == 400 and "table" in hostile.content.decode()

    charlie_api = api_for(charlie_owner, charlie)
    for path in (
        f"/api/v1/destinations/database/{body['id']}/",
        f"/api/v1/destinations/{body['id']}/",
        f"/api/v1/destinations/{body['id']}/stats/",
    ):
        assert charlie_api.get(path).status_code == 404, path
    assert charlie_api.post(f"/api/v1/destinations/{body['id']}/test/").status_code == 404
    assert charlie_api.get("/api/v1/destinations/database/").json()["results"] == []
