"""Rotating a signing secret: both signatures during the grace period, then only the new one."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from apps.forwarding import actions
from apps.forwarding.outbox import write_outbox
from apps.forwarding.webhook.models import WebhookDestination

from .conftest import deliver_due, make_event, make_webhook
from .receiver import signed_by


def test_rotation_sends_two_signatures_then_one(receiver, alice_owner, alice_lamp) -> None:
    hook = make_webhook(alice_owner, receiver.url())
    old = hook.secret.reveal()
    new = actions.rotate_secret(hook, grace=timedelta(hours=1))
    assert new != old and new.startswith("whsec_")

    write_outbox([make_event(alice_lamp)])
    deliver_due()
    during = receiver.requests[-1]
    assert len(during.signatures()) == 2
    assert signed_by(during, new) and signed_by(during, old)

    # The grace period ends (the pipeline re-reads settings; here, at the next drain).
    WebhookDestination.objects.filter(pk=hook.pk).update(
        previous_secret_expires_at=timezone.now() - timedelta(seconds=1),
        updated_at=timezone.now(),
    )
    from apps.forwarding import kinds

    kinds.close_transports()  # a fresh worker process: no cached settings
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    after = receiver.requests[-1]
    assert len(after.signatures()) == 1
    assert signed_by(after, new) and not signed_by(after, old)


def test_the_secrets_are_stored_encrypted(alice_owner, receiver) -> None:
    hook = make_webhook(alice_owner, receiver.url())
    actions.rotate_secret(hook)
    hook.refresh_from_db()
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT secret, previous_secret FROM forwarding_webhookdestination "
            "WHERE destination_ptr_id = %s",
            [hook.pk],
        )
        stored = cursor.fetchone()
    assert all(value and "whsec_" not in value for value in stored)
    assert "whsec_" not in repr(hook.secret) and "whsec_" not in str(hook.secret)
