"""Every registered admin page renders (catches template and display-method errors)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone

from apps.devices.models import (
    Command,
    DeviceCredential,
    EventKind,
    IssuerType,
    QuarantinedMessage,
    QuarantineReason,
    Telemetry,
    Transition,
    TransitionKind,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alice, bob, charlie, alice_lamp, alice_relay, alice_meter, charlie_lamp):
    """One row of every devices model, so change pages have something to show."""
    now = timezone.now()
    alice_relay.power = {"1": "ON", "2": "OFF"}
    alice_relay.last_seen_at = now
    alice_relay.last_reading = {"Wifi": {"RSSI": 60}}
    alice_relay.save()
    owner = alice_lamp.owner
    Telemetry.objects.create(
        owner=owner,
        device=alice_meter,
        kind=EventKind.TELEMETRY,
        topic="iot/alice-meter-1/telemetry",
        data={"data": {"voltage": 750.2}},
        ts=now,
        received_at=now,
        seq=1,
    )
    Transition.objects.create(
        owner=owner,
        device=alice_lamp,
        kind=TransitionKind.POWER,
        relay=1,
        old="OFF",
        new="ON",
        cause="status",
        at=now,
    )
    Command.objects.create(
        owner=owner,
        device=alice_lamp,
        action="TOGGLE",
        issuer_type=IssuerType.USER,
        issued_at=now,
        expires_at=now + timedelta(seconds=30),
    )
    QuarantinedMessage.objects.create(
        received_at=now,
        topic="home/ghost/status",
        reason=QuarantineReason.UNKNOWN_DEVICE,
        payload=b"{}",
        size=2,
    )
    cred = DeviceCredential(owner=owner, device=alice_lamp, username="alice-lamp-1")
    cred.password = "pw"
    cred.save()


def admin_urls(model, model_admin):
    info = (model._meta.app_label, model._meta.model_name)
    yield reverse("admin:{}_{}_changelist".format(*info))
    yield reverse("admin:{}_{}_add".format(*info))
    obj = model_admin.model._default_manager.order_by("pk").first()
    if obj is not None:
        yield reverse("admin:{}_{}_change".format(*info), args=[obj.pk])
        yield reverse("admin:{}_{}_history".format(*info), args=[obj.pk])


@pytest.mark.usefixtures("world")
@pytest.mark.parametrize("who", ["admin_user", "alice", "bob", "charlie"])
def test_every_admin_page_renders(client, request, who):
    client.force_login(request.getfixturevalue(who))
    assert client.get(reverse("admin:index")).status_code == 200
    failures = []
    for model, model_admin in admin.site._registry.items():
        for url in admin_urls(model, model_admin):
            response = client.get(url)
            # 403: not allowed (e.g. add on a log, users for members); 404: another owner's row.
            if response.status_code not in (200, 403, 404):
                failures.append((url, response.status_code))
            elif response.status_code == 200 and hasattr(response, "render"):
                response.render()
    assert not failures
