"""The periodic sweep: lost leases back in line, a drain kicked when something is due, and
retention that keeps dead letters longer than delivered rows."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from apps.forwarding import actions, claims, outbox, tasks
from apps.forwarding.models import Attempt, Delivery, Status
from apps.forwarding.outbox import write_outbox

from .conftest import deliver_due, make_event, make_webhook
from .receiver import Answer


def test_the_sweep_reclaims_lost_leases_and_kicks_a_drain(
    receiver, alice_owner, alice_lamp, monkeypatch
) -> None:
    kicked: list[dict] = []
    monkeypatch.setattr(tasks.drain, "apply_async", lambda **kw: kicked.append(kw))
    hook = make_webhook(alice_owner, receiver.url())
    write_outbox([make_event(alice_lamp) for _ in range(3)])
    claims.claim(hook.pk, 3, "lost-worker", lease_seconds=-1)  # already expired
    actions.sweep()
    assert set(Delivery.objects.values_list("status", flat=True)) == {Status.PENDING}
    assert len(kicked) == 1
    deliver_due()
    assert Delivery.objects.filter(status=Status.DELIVERED).count() == 3


def test_retention_keeps_dead_letters_longer(receiver, alice_owner, alice_lamp, settings) -> None:
    settings.DELIVERY_RETENTION_DAYS = 7
    settings.DELIVERY_DEAD_RETENTION_DAYS = 30
    receiver.script("/hook", Answer(200), Answer(400))
    hook = make_webhook(alice_owner, receiver.url(), max_in_flight=1)
    write_outbox([make_event(alice_lamp) for _ in range(2)])
    deliver_due()
    delivered = Delivery.objects.get(destination=hook, status=Status.DELIVERED)
    dead = Delivery.objects.get(destination=hook, status=Status.FAILED)
    ten_days_ago = timezone.now() - timedelta(days=10)
    Delivery.objects.update(created_at=ten_days_ago)
    Attempt.objects.update(started_at=ten_days_ago)
    assert actions.prune() == 1
    assert not Delivery.objects.filter(pk=delivered.pk).exists()
    assert Delivery.objects.filter(pk=dead.pk).exists()
    assert Attempt.objects.filter(delivery=dead).exists()
    assert actions.prune(now=timezone.now() + timedelta(days=25)) == 1
    assert not Delivery.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_rows_for_a_destination_deleted_under_a_listener_commit_and_are_swept(
    receiver, alice_owner, alice_lamp
) -> None:
    kept = make_webhook(alice_owner, receiver.url())
    doomed = make_webhook(alice_owner, receiver.url())
    outbox.routes_for({alice_owner.pk})  # a listener's route cache, as it was a moment ago
    doomed_pk = doomed.pk
    doomed.delete()  # elsewhere (admin, API): the listener's cache does not know yet
    with transaction.atomic():  # a real commit: nothing refuses the rows any more
        write_outbox([make_event(alice_lamp) for _ in range(3)])
    assert Delivery.objects.filter(destination_id=doomed_pk).count() == 3
    assert Delivery.objects.filter(destination=kept).count() == 3

    actions.sweep()

    assert not Delivery.objects.filter(destination_id=doomed_pk).exists()
    assert Delivery.objects.filter(destination=kept).count() == 3
    assert actions.remove_orphans() == 0  # nothing left to find
    deliver_due()
    assert Delivery.objects.filter(destination=kept, status=Status.DELIVERED).count() == 3


def test_orphan_search_skips_destinations_without_pending_rows(
    receiver, alice_owner, alice_lamp
) -> None:
    hook = make_webhook(alice_owner, receiver.url())
    write_outbox([make_event(alice_lamp) for _ in range(2)])
    deliver_due()  # delivered rows of a live destination: not orphans
    assert actions.remove_orphans() == 0
    assert Delivery.objects.filter(destination=hook).count() == 2
