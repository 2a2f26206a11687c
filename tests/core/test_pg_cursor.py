"""apps.core.pg.binary_cursor: server-bound parameters, integers always as bigint."""

from __future__ import annotations

import pytest
from django.db import connection

from apps.core.pg import binary_cursor
from apps.devices.models import Device

pytestmark = [pytest.mark.django_db, pytest.mark.services]


@pytest.fixture(autouse=True)
def _postgres_only():
    if connection.vendor != "postgresql":
        pytest.skip("the hot paths' PostgreSQL cursor")


@pytest.mark.parametrize("binary_results", [False, True])
def test_small_integers_are_sent_as_bigint(binary_results):
    # psycopg's default would send [1, 2, 3] as smallint[]: `bigint = ANY(smallint[])` cannot be
    # hashed, so a sequential scan compared every row with every element.
    with binary_cursor(connection, binary_results=binary_results) as cursor:
        cursor.execute("SELECT pg_typeof(%b)::text, pg_typeof(%b)::text", [[1, 2, 3], 7])
        assert cursor.fetchone() == ("bigint[]", "bigint")


def test_a_batch_of_devices_is_found_by_a_hashable_comparison(alice_owner):
    pks = [
        Device.objects.create(owner=alice_owner, device_id=f"m{i}", topic=f"m{i}").pk
        for i in range(20)
    ]
    table = Device._meta.db_table
    with binary_cursor(connection) as cursor:
        cursor.execute("SET LOCAL enable_indexscan = off")  # the plan of a scan, whatever the costs
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        cursor.execute(f"EXPLAIN SELECT id FROM {table} WHERE id = ANY(%b)", [pks])  # noqa: S608
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute(f"SELECT id FROM {table} WHERE id = ANY(%b) ORDER BY id", [pks[::2]])  # noqa: S608
        assert [row[0] for row in cursor.fetchall()] == pks[::2]
    assert "::bigint[]" in plan, plan
    assert "smallint" not in plan, plan
