"""Destinations that keep failing: owners are alerted, long failures disable the destination
with the reason shown, and re-enabling drains the backlog in order."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from apps.forwarding import actions
from apps.forwarding.models import AlertKind, Delivery, DeliveryAlert, Destination, Status
from apps.forwarding.outbox import write_outbox

from .conftest import deliver_due, make_due_now, make_event, make_webhook
from .receiver import Answer


def test_a_destination_failing_for_long_is_alerted_then_disabled(
    receiver, alice_owner, alice_lamp, settings
) -> None:
    settings.DELIVERY_ALERT_AFTER_MINUTES = 60
    settings.DELIVERY_DISABLE_AFTER_HOURS = 72
    receiver.script("/hook", Answer(500))
    hook = make_webhook(alice_owner, receiver.url())
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    hook.refresh_from_db()
    assert hook.failing_since is not None and hook.enabled

    now = timezone.now()
    actions.check_failing(now=now + timedelta(minutes=30))
    assert not DeliveryAlert.objects.exists()
    actions.check_failing(now=now + timedelta(minutes=61))
    actions.check_failing(now=now + timedelta(minutes=62))  # alerted once, not every sweep
    [alert] = DeliveryAlert.objects.all()
    assert alert.kind == AlertKind.FAILING and "HTTP 500" in alert.message

    actions.check_failing(now=now + timedelta(hours=73))
    hook.refresh_from_db()
    assert not hook.enabled and "failed for 72 hours" in hook.disabled_reason
    assert DeliveryAlert.objects.filter(kind=AlertKind.DISABLED).count() == 1


def test_a_success_clears_the_failing_state(receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(500), Answer(200))
    hook = make_webhook(alice_owner, receiver.url())
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    make_due_now()
    deliver_due()
    hook.refresh_from_db()
    assert hook.failing_since is None and hook.last_success_at is not None


def test_re_enabling_drains_the_backlog_in_order(receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(410), Answer(200))
    hook = make_webhook(alice_owner, receiver.url(), max_in_flight=1)
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    hook.refresh_from_db()
    assert not hook.enabled
    # Events written while it was enabled (before the 410 was seen) wait in the backlog.
    Destination.objects.filter(pk=hook.pk).update(enabled=True)
    actions.outbox.forget_routes()
    write_outbox([make_event(alice_lamp) for _ in range(5)])
    Destination.objects.filter(pk=hook.pk).update(enabled=False)
    Delivery.objects.filter(destination=hook).update(
        next_attempt_at=timezone.now() + timedelta(hours=1)
    )
    assert deliver_due().claimed == 0

    assert actions.enable_destination(hook) == 6
    deliver_due()
    ids = [r.headers["webhook-id"] for r in receiver.requests[1:]]
    expected = list(Delivery.objects.order_by("id").values_list("message_id", flat=True))
    assert ids == expected  # oldest first, the 410'd one included
    assert not Delivery.objects.exclude(status=Status.DELIVERED).exists()
    assert DeliveryAlert.objects.get().resolved_at is not None
