"""A database destination whose host name never resolves (a silent DNS server, at the guard's
seam) fails within the connect timeout with the generic text — in the pipeline, in Test
Connection and at save time — against the real servers otherwise."""

from __future__ import annotations

import time

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from apps.forwarding import actions, egress
from apps.forwarding.database.base import CONNECT_TIMEOUT
from apps.forwarding.database.models import DatabaseDestination
from apps.forwarding.models import Delivery, Status
from apps.forwarding.outbox import write_outbox

from ..conftest import deliver_due, make_event
from ..dns import HANG
from .conftest import create_readings, make_db_destination

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

WELL_UNDER_THE_HANG = HANG * 2 / 3  # the connect timeout is 5 s; a second try may join it


def moved_to(destination: DatabaseDestination, host: str) -> DatabaseDestination:
    """The destination, now at `host` (written around the save-time lookup, which would fail)."""
    DatabaseDestination.objects.filter(pk=destination.pk).update(
        host=host, updated_at=timezone.now()
    )
    return DatabaseDestination.objects.get(pk=destination.pk)


def test_a_batch_for_a_host_whose_lookup_hangs_fails_within_the_connect_timeout(
    target_db, dns, alice_owner, alice_meter
) -> None:
    create_readings(target_db)
    name = dns.hang()
    destination = moved_to(make_db_destination(alice_owner, target_db), name)
    write_outbox([make_event(alice_meter, data={"power": 1.0}) for _ in range(5)])
    t0 = time.monotonic()
    deliver_due()
    assert time.monotonic() - t0 < WELL_UNDER_THE_HANG
    statuses = Delivery.objects.filter(destination=destination).values_list("status", flat=True)
    assert set(statuses) == {Status.PENDING}
    destination.refresh_from_db()
    assert destination.last_error.endswith(egress.GENERIC_ERROR)
    assert name not in destination.last_error
    assert target_db.count("readings") == 0
    assert dns.calls[name] == 1


def test_test_connection_with_a_hanging_host_lookup_reports_the_generic_failure(
    target_db, dns, alice_owner
) -> None:
    create_readings(target_db)
    destination = moved_to(make_db_destination(alice_owner, target_db), dns.hang())
    t0 = time.monotonic()
    result = actions.test_destination(destination)
    assert time.monotonic() - t0 < CONNECT_TIMEOUT + 10
    assert not result.ok and result.message.split(" — Warning:")[0] == egress.GENERIC_ERROR


def test_saving_a_host_whose_lookup_hangs_is_refused_within_seconds(
    postgres_db, dns, alice_owner, monkeypatch
) -> None:
    monkeypatch.setattr(egress, "SAVE_LOOKUP_TIMEOUT", 1.0)
    t0 = time.monotonic()
    with pytest.raises(ValidationError) as raised:
        make_db_destination(alice_owner, postgres_db, host=dns.hang())
    assert time.monotonic() - t0 < WELL_UNDER_THE_HANG
    assert raised.value.message_dict["host"] == [egress.SAVE_ERROR]
