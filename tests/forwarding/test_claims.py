"""Claiming is atomic (SKIP LOCKED on PostgreSQL, a conditional UPDATE on SQLite), leases of a
lost worker expire and are reclaimed, and a presumed-dead worker cannot overwrite newer state.

Run these on PostgreSQL too: DATABASE_URL=postgres://root@127.0.0.1:5432/iot_<name>.
"""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from django.db import close_old_connections, connection
from django.utils import timezone

from apps.forwarding import claims
from apps.forwarding.claims import Result
from apps.forwarding.models import Attempt, Delivery, Outcome, Status
from apps.forwarding.outbox import write_outbox
from apps.forwarding.retry import RetryPolicy

from .conftest import make_event, make_webhook


def _fill(hook, device, n: int) -> None:
    for start in range(0, n, 500):
        write_outbox([make_event(device) for _ in range(min(500, n - start))])
    assert Delivery.objects.filter(destination=hook).count() == n


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_never_share_a_row(receiver, alice_owner, alice_lamp) -> None:
    hook = make_webhook(alice_owner, receiver.url())
    _fill(hook, alice_lamp, 1200)
    taken: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        token = uuid.uuid4().hex
        mine = taken.setdefault(token, [])
        try:
            barrier.wait()
            while rows := claims.claim(hook.pk, 37, token, lease_seconds=60):
                mine.extend(r.id for r in rows)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    everything = [i for ids in taken.values() for i in ids]
    assert len(everything) == len(set(everything)) == 1200
    assert sum(1 for ids in taken.values() if ids) >= 2  # they really ran side by side
    assert set(Delivery.objects.values_list("status", flat=True)) == {Status.SENDING}
    assert set(Delivery.objects.values_list("attempts", flat=True)) == {1}


def test_a_claim_takes_due_rows_oldest_first_and_counts_the_attempt(
    receiver, alice_owner, alice_lamp
) -> None:
    hook = make_webhook(alice_owner, receiver.url())
    _fill(hook, alice_lamp, 10)
    later = Delivery.objects.order_by("id")[:3]
    Delivery.objects.filter(id__in=[d.id for d in later]).update(
        next_attempt_at=timezone.now() + timedelta(minutes=5)
    )
    rows = claims.claim(hook.pk, 4, "t1", lease_seconds=40)
    due_ids = list(Delivery.objects.order_by("id").values_list("id", flat=True))[3:7]
    assert [r.id for r in rows] == due_ids
    assert all(r.attempt == 1 and r.payload["device"]["id"] == "alice-lamp-1" for r in rows)
    leased = Delivery.objects.get(id=rows[0].id)
    assert leased.status == Status.SENDING and leased.lease_token == "t1"
    assert 35 <= (leased.lease_expires_at - timezone.now()).total_seconds() <= 41
    assert len(claims.claim(hook.pk, 100, "t2", lease_seconds=40)) == 3  # the rest that is due


def test_an_expired_lease_is_reclaimed_and_logged(receiver, alice_owner, alice_lamp) -> None:
    hook = make_webhook(alice_owner, receiver.url())
    _fill(hook, alice_lamp, 3)
    rows = claims.claim(hook.pk, 3, "dead-worker", lease_seconds=30)
    assert claims.reclaim_expired() == 0  # still leased
    later = timezone.now() + timedelta(seconds=31)
    assert claims.reclaim_expired(now=later) == 3
    for delivery in Delivery.objects.all():
        assert delivery.status == Status.PENDING and delivery.lease_token is None
        assert delivery.attempts == 1  # the lost attempt counts
    interrupted = Attempt.objects.filter(outcome=Outcome.INTERRUPTED)
    assert sorted(a.delivery_id for a in interrupted) == sorted(r.id for r in rows)
    # Claimable again, by another worker, as attempt 2.
    again = claims.claim(hook.pk, 10, "new-worker", lease_seconds=30, now=later)
    assert sorted(r.attempt for r in again) == [2, 2, 2]


def test_a_late_result_from_a_presumed_dead_worker_is_ignored(
    receiver, alice_owner, alice_lamp
) -> None:
    hook = make_webhook(alice_owner, receiver.url())
    _fill(hook, alice_lamp, 1)
    [row] = claims.claim(hook.pk, 1, "old", lease_seconds=1)
    later = timezone.now() + timedelta(seconds=2)
    claims.reclaim_expired(now=later)
    [again] = claims.claim(hook.pk, 1, "new", lease_seconds=60, now=later)

    def result(outcome: str) -> Result:
        return Result(row.id, hook.pk, alice_owner.pk, 1, timezone.now(), 5, outcome, 500)

    stale = claims.record([result(Outcome.FAILED)], "old", {hook.pk: RetryPolicy()})
    assert stale.stale == 1 and stale.failed == 0
    assert Delivery.objects.get(id=row.id).status == Status.SENDING  # still the new lease
    done = claims.record(
        [Result(again.id, hook.pk, alice_owner.pk, 2, timezone.now(), 5, Outcome.DELIVERED, 200)],
        "new",
        {hook.pk: RetryPolicy()},
    )
    assert done.delivered == 1
    assert Delivery.objects.get(id=row.id).status == Status.DELIVERED
