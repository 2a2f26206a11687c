"""TimeOrderIndex: BRIN on PostgreSQL, a B-tree elsewhere, and the range queries still use it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.forwarding.models import Attempt, Delivery

pytestmark = pytest.mark.django_db


def _index_type(model, name: str) -> str:
    with connection.cursor() as cursor:
        return connection.introspection.get_constraints(cursor, model._meta.db_table)[name]["type"]


@pytest.mark.parametrize(
    ("model", "name"), [(Delivery, "delivery_created"), (Attempt, "attempt_started")]
)
def test_time_order_index_kind(model, name):
    kind = _index_type(model, name)
    if connection.vendor == "postgresql":
        assert kind == "brin"
    else:
        assert kind in {"idx", "btree"}  # SQLite reports its B-trees as "idx"


@pytest.mark.services
def test_a_time_range_on_the_outbox_reads_it_through_the_brin_index():
    if connection.vendor != "postgresql":
        pytest.skip("BRIN is PostgreSQL's")
    # Time ranges are what the index is for (retention, replay by time, the admin's dates).
    table = Delivery._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # the plan, not the planner's costs
        since = timezone.now() - timedelta(hours=1)
        cursor.execute(f"EXPLAIN SELECT id FROM {table} WHERE created_at >= %s", [since])  # noqa: S608
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "delivery_created" in plan
    assert "Bitmap Index Scan" in plan  # how PostgreSQL reads a BRIN index
