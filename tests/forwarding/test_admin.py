"""The Data Delivery admin: alice manages and watches her destinations; secrets are write-only
and masked; bob (viewer) looks but cannot act; charlie sees and changes nothing of alice's."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from apps.forwarding.models import Delivery, Destination, Status
from apps.forwarding.outbox import write_outbox
from apps.forwarding.webhook.models import WebhookDestination, WebhookHeader

from .conftest import deliver_due, make_due_now, make_event, make_webhook
from .receiver import Answer, signed_by


@pytest.fixture
def world(receiver, alice_owner, alice_lamp):
    """Alice's destination with a secret header, some deliveries, a dead letter."""
    receiver.script("/hook", Answer(200), Answer(200), Answer(400, body=b"bad payload"))
    hook = make_webhook(alice_owner, receiver.url(), name="Alice's lake")
    WebhookHeader.objects.create(destination=hook, name="Authorization", secret_value="Bearer T0P")
    write_outbox([make_event(alice_lamp, data={"voltage": 231.5}) for _ in range(3)])
    deliver_due()
    for _ in range(3):  # a loaded machine may reset a connection: retry until settled
        if not Delivery.objects.filter(status=Status.PENDING).exists():
            break
        make_due_now()
        deliver_due()
    hook.refresh_from_db()
    assert (hook.delivered_count, hook.failed_count) == (2, 1)
    return hook


def owner_page(owner) -> str:
    return reverse("admin:owners_owner_change", args=[owner.pk])


def test_alice_sees_figures_on_the_data_delivery_tab(client, alice, world, alice_owner) -> None:
    client.force_login(alice)
    html = client.get(owner_page(alice_owner)).content.decode()
    assert "Data Delivery" in html and "Alice&#x27;s lake" in html
    table = html[html.index('id="delivery-destinations"') :].replace(" ", "")
    assert ">2<br>" in table  # delivered
    assert "1failed" in table
    assert "bad payload" in html  # the attempt log keeps the truncated response
    assert "Replay" in html and "Test now" in html


def test_secrets_are_never_rendered(client, alice, world, alice_owner) -> None:
    client.force_login(alice)
    secret = world.secret.reveal()
    pages = [
        owner_page(alice_owner),
        reverse("admin:forwarding_webhookdestination_change", args=[world.pk]),
        reverse("admin:forwarding_webhookdestination_changelist"),
        reverse("admin:forwarding_delivery_changelist"),
        reverse("admin:forwarding_delivery_change", args=[Delivery.objects.first().pk]),
    ]
    for url in pages:
        html = client.get(url).content.decode()
        assert secret not in html, url
        assert not re.search(r"whsec_[A-Za-z0-9+/]{16}", html), url
        assert "T0P" not in html, url


def test_creating_a_destination_shows_the_generated_secret_once(
    client, alice, alice_owner, receiver, django_capture_on_commit_callbacks
) -> None:
    client.force_login(alice)
    data = {
        "owner": alice_owner.pk,
        "name": "new hook",
        "url": receiver.url(),
        "method": "POST",
        "enabled": "on",
        "secret": "",
        "timeout": 10,
        "max_attempts": 8,
        "initial_delay": 5,
        "backoff_factor": 6,
        "max_delay": 36000,
        "max_in_flight": 16,
        "headers-TOTAL_FORMS": 0,
        "headers-INITIAL_FORMS": 0,
    }
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(reverse("admin:forwarding_webhookdestination_add"), data)
    assert response.status_code == 200, response.content[:2000]
    hook = WebhookDestination.objects.get(name="new hook")
    shown = re.search(r'value="(whsec_[^"]+)"', response.content.decode()).group(1)
    assert shown == hook.secret.reveal()
    assert "no-store" in response["Cache-Control"]
    assert callbacks  # Test Connection is queued after commit
    page = client.get(reverse("admin:forwarding_webhookdestination_change", args=[hook.pk]))
    assert shown not in page.content.decode()


def test_test_connection_sends_a_signed_ping_and_stores_the_result(
    client, alice, world, alice_owner, receiver
) -> None:
    client.force_login(alice)
    receiver.script("/hook", Answer(204, body=b""))
    url = reverse("admin:forwarding_webhookdestination_test", args=[world.pk])
    response = client.post(url, {"next": owner_page(alice_owner)})
    assert response.status_code == 302
    ping = receiver.requests[-1]
    assert ping.headers["webhook-id"].startswith("msg_ping_")
    assert signed_by(ping, world.secret.reveal())
    world.refresh_from_db()
    assert world.last_test_ok and world.last_test_status == 204
    html = client.get(owner_page(alice_owner)).content.decode()
    assert "HTTP 204" in html


def test_rotating_shows_the_new_secret_once(client, alice, world) -> None:
    client.force_login(alice)
    old = world.secret.reveal()
    response = client.post(reverse("admin:forwarding_webhookdestination_rotate", args=[world.pk]))
    world.refresh_from_db()
    new = world.secret.reveal()
    assert new != old and new in response.content.decode()
    assert world.previous_secret.reveal() == old


def test_alice_replays_a_dead_letter_from_the_tab(client, alice, world, alice_owner) -> None:
    client.force_login(alice)
    dead = Delivery.objects.get(status=Status.FAILED)
    client.post(reverse("admin:forwarding_delivery_replay"), {"id": dead.pk})
    dead.refresh_from_db()
    assert dead.status == Status.PENDING and dead.replays == 1


def test_bob_the_viewer_looks_but_cannot_act(client, bob, world, alice_owner) -> None:
    client.force_login(bob)
    assert client.get(owner_page(alice_owner)).status_code == 200
    change = reverse("admin:forwarding_webhookdestination_change", args=[world.pk])
    assert client.get(change).status_code == 200
    assert (
        client.post(
            reverse("admin:forwarding_webhookdestination_test", args=[world.pk])
        ).status_code
        == 404
    )
    assert (
        client.post(
            reverse("admin:forwarding_webhookdestination_rotate", args=[world.pk])
        ).status_code
        == 404
    )
    dead = Delivery.objects.get(status=Status.FAILED)
    client.post(reverse("admin:forwarding_delivery_replay"), {"id": dead.pk})
    assert Delivery.objects.get(pk=dead.pk).status == Status.FAILED


def test_charlie_sees_and_changes_nothing_of_alices(client, charlie, world, alice_owner) -> None:
    client.force_login(charlie)
    delivery = Delivery.objects.first()
    dead = Delivery.objects.get(status=Status.FAILED)
    attempt = delivery.attempt_log.first()
    for url in [
        owner_page(alice_owner),
        reverse("admin:forwarding_webhookdestination_change", args=[world.pk]),
        reverse("admin:forwarding_delivery_change", args=[delivery.pk]),
        reverse("admin:forwarding_attempt_change", args=[attempt.pk]),
    ]:
        assert client.get(url).status_code == 404, url
    for url in [
        reverse("admin:forwarding_webhookdestination_changelist"),
        reverse("admin:forwarding_delivery_changelist"),
        reverse("admin:forwarding_attempt_changelist"),
        reverse("admin:forwarding_deliveryalert_changelist"),
    ]:
        html = client.get(url).content.decode()
        assert "Alice" not in html and "alice-lamp-1" not in html and "231.5" not in html, url
    for url in [
        reverse("admin:forwarding_webhookdestination_test", args=[world.pk]),
        reverse("admin:forwarding_webhookdestination_rotate", args=[world.pk]),
        reverse("admin:forwarding_webhookdestination_enabled", args=[world.pk]),
    ]:
        assert client.post(url, {"enabled": "0"}).status_code == 404, url
    client.post(reverse("admin:forwarding_delivery_replay"), {"id": dead.pk})
    client.post(reverse("admin:forwarding_delivery_replay"), {"destination": world.pk})
    assert Delivery.objects.get(pk=dead.pk).status == Status.FAILED
    hook = Destination.objects.get(pk=world.pk)
    assert hook.enabled and hook.last_test_at is None


def test_the_tab_refreshes_itself_for_members_only(client, alice, charlie, world, alice_owner):
    url = reverse("admin:forwarding_delivery_owner_tab", args=[alice_owner.pk])
    client.force_login(alice)
    html = client.get(url).content.decode()
    assert 'id="delivery-tab"' in html and "Alice&#x27;s lake" in html
    client.force_login(charlie)
    assert client.get(url).status_code == 404


def test_rows_of_a_just_deleted_destination_do_not_break_the_pages(
    client, alice, receiver, alice_owner, alice_lamp
) -> None:
    """Until the sweep removes them, outbox rows a listener wrote for a destination deleted
    under its route cache are hidden (the outbox has no database foreign keys)."""
    from django.db import transaction

    from apps.forwarding import outbox

    doomed = make_webhook(alice_owner, receiver.url())
    outbox.routes_for({alice_owner.pk})  # the listener's cache, a moment ago
    doomed.delete()
    with transaction.atomic():
        write_outbox([make_event(alice_lamp)])
    stray = Delivery.objects.get()
    client.force_login(alice)
    change = client.get(reverse("admin:forwarding_delivery_change", args=[stray.pk]))
    assert change.status_code == 404  # as for any object not to be seen, not a server error
    listing = client.get(reverse("admin:forwarding_delivery_changelist"))
    assert listing.status_code == 200 and stray.message_id not in listing.content.decode()
    assert client.get(owner_page(alice_owner)).status_code == 200
