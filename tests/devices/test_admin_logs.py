"""Read-only logs in the admin: telemetry, transitions, commands, quarantine, credentials."""

from __future__ import annotations

from datetime import timedelta

import pytest
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

QUARANTINE = reverse("admin:devices_quarantinedmessage_changelist")


def telemetry(device, **fields) -> Telemetry:
    now = timezone.now()
    return Telemetry.objects.create(
        owner=device.owner,
        device=device,
        kind=EventKind.TELEMETRY,
        topic=f"iot/{device.device_id}/telemetry",
        data={"voltage": 230.5},
        ts=now,
        received_at=now,
        **fields,
    )


def transition(device) -> Transition:
    return Transition.objects.create(
        owner=device.owner,
        device=device,
        kind=TransitionKind.CONNECTION,
        old="offline",
        new="online",
        cause="lwt",
        at=timezone.now(),
    )


def command(device) -> Command:
    now = timezone.now()
    return Command.objects.create(
        owner=device.owner,
        device=device,
        action="ON",
        issuer_type=IssuerType.USER,
        issuer_label="alice",
        issued_at=now,
        expires_at=now + timedelta(minutes=1),
    )


def quarantined(owner=None, reason=QuarantineReason.MALFORMED, payload=b"{", **fields):
    return QuarantinedMessage.objects.create(
        owner=owner,
        received_at=timezone.now(),
        topic="home/x/status",
        reason=reason,
        payload=payload,
        size=len(payload),
        **fields,
    )


LOGS = [
    ("telemetry", telemetry),
    ("transition", transition),
    ("command", command),
]


@pytest.mark.parametrize(("model_name", "make"), LOGS)
def test_charlie_gets_404_for_alices_log_rows_and_sees_none_in_lists(
    client, charlie, alice_lamp, charlie_lamp, model_name, make
):
    alices, charlies = make(alice_lamp), make(charlie_lamp)
    client.force_login(charlie)
    change = reverse(f"admin:devices_{model_name}_change", args=[alices.pk])
    assert client.get(change).status_code == 404
    response = client.get(reverse(f"admin:devices_{model_name}_changelist"))
    assert list(response.context["cl"].result_list) == [charlies]
    assert (
        client.get(reverse(f"admin:devices_{model_name}_change", args=[charlies.pk])).status_code
        == 200
    )


@pytest.mark.parametrize(("model_name", "make"), LOGS)
def test_log_rows_are_read_only_even_for_the_owner(client, alice, alice_lamp, model_name, make):
    row = make(alice_lamp)
    client.force_login(alice)
    response = client.get(reverse(f"admin:devices_{model_name}_change", args=[row.pk]))
    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    assert client.get(reverse(f"admin:devices_{model_name}_add")).status_code == 403
    delete = reverse(f"admin:devices_{model_name}_delete", args=[row.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403


def test_the_device_filter_does_not_name_a_foreign_device(
    client, charlie, alice_lamp, charlie_lamp
):
    telemetry(alice_lamp)
    client.force_login(charlie)
    url = reverse("admin:devices_telemetry_changelist")
    response = client.get(url, {"device__id__exact": alice_lamp.pk})
    body = response.content.decode()
    assert list(response.context["cl"].result_list) == []
    assert "Living room" not in body and "alice-lamp-1" not in body


def test_telemetry_list_filters_by_device(client, alice, alice_lamp, alice_relay):
    mine = telemetry(alice_lamp)
    telemetry(alice_relay)
    client.force_login(alice)
    response = client.get(
        reverse("admin:devices_telemetry_changelist"), {"device__id__exact": alice_lamp.pk}
    )
    assert list(response.context["cl"].result_list) == [mine]


# --- quarantine -----------------------------------------------------------------------------------


def test_members_see_their_quarantine_and_superusers_see_all(
    client, alice, charlie, admin_user, alice_owner, charlie_owner
):
    alices = quarantined(alice_owner)
    charlies = quarantined(charlie_owner)
    orphan = quarantined(None, QuarantineReason.UNKNOWN_DEVICE)

    client.force_login(alice)
    assert list(client.get(QUARANTINE).context["cl"].result_list) == [alices]
    assert (
        client.get(reverse("admin:devices_quarantinedmessage_change", args=[orphan.pk])).status_code
        == 404
    )
    assert (
        client.get(
            reverse("admin:devices_quarantinedmessage_change", args=[charlies.pk])
        ).status_code
        == 404
    )

    client.force_login(admin_user)
    assert set(client.get(QUARANTINE).context["cl"].result_list) == {alices, charlies, orphan}


def test_quarantine_counts_by_reason_above_the_list(client, admin_user, alice_owner, charlie_owner):
    for _ in range(3):
        quarantined(None, QuarantineReason.UNKNOWN_DEVICE)
    quarantined(alice_owner, QuarantineReason.MALFORMED)
    quarantined(charlie_owner, QuarantineReason.OVERSIZE)
    client.force_login(admin_user)
    response = client.get(QUARANTINE)
    counts = {row["reason"]: row["count"] for row in response.context["reason_counts"]}
    assert counts == {"unknown_device": 3, "malformed": 1, "oversize": 1}
    assert response.context["reason_counts"][0]["reason"] == "unknown_device"  # largest first
    assert 'id="quarantine-counts"' in response.content.decode()


def test_quarantine_counts_follow_scope_and_filters(client, alice, alice_owner, charlie_owner):
    quarantined(alice_owner, QuarantineReason.MALFORMED)
    quarantined(alice_owner, QuarantineReason.OVERSIZE)
    quarantined(charlie_owner, QuarantineReason.MALFORMED)
    quarantined(None, QuarantineReason.UNKNOWN_DEVICE)
    client.force_login(alice)
    counts = client.get(QUARANTINE).context["reason_counts"]
    assert {r["reason"]: r["count"] for r in counts} == {"malformed": 1, "oversize": 1}
    filtered = client.get(QUARANTINE, {"reason__exact": "oversize"}).context["reason_counts"]
    assert [(r["reason"], r["count"]) for r in filtered] == [("oversize", 1)]


def test_quarantined_payloads_are_escaped(client, admin_user):
    row = quarantined(None, payload=b"<script>alert('x')</script>\xff")
    client.force_login(admin_user)
    for url in (QUARANTINE, reverse("admin:devices_quarantinedmessage_change", args=[row.pk])):
        body = client.get(url).content.decode()
        assert "<script>alert" not in body
        assert "&lt;script&gt;alert(" in body


def test_members_cannot_delete_quarantine_rows_operators_can(
    client, alice, admin_user, alice_owner
):
    row = quarantined(alice_owner)
    delete = reverse("admin:devices_quarantinedmessage_delete", args=[row.pk])
    client.force_login(alice)
    assert client.post(delete, {"post": "yes"}).status_code == 403
    client.force_login(admin_user)
    assert client.post(delete, {"post": "yes"}).status_code == 302
    assert not QuarantinedMessage.objects.filter(pk=row.pk).exists()


# --- broker credentials ---------------------------------------------------------------------------


@pytest.fixture
def alice_credential(alice_lamp) -> DeviceCredential:
    cred = DeviceCredential(owner=alice_lamp.owner, device=alice_lamp, username="alice-lamp-1")
    cred.password = "s3cret-broker-pass"
    cred.save()
    return cred


def test_the_broker_password_never_appears(client, alice, admin_user, alice_credential):
    stored = DeviceCredential.objects.values_list("password", flat=True).get()
    change = reverse("admin:devices_devicecredential_change", args=[alice_credential.pk])
    for user in (alice, admin_user):
        client.force_login(user)
        body = client.get(change).content.decode()
        assert "s3cret-broker-pass" not in body
        assert stored not in body  # nor its ciphertext


def test_credentials_are_read_only_for_members_and_scoped(client, alice, charlie, alice_credential):
    change = reverse("admin:devices_devicecredential_change", args=[alice_credential.pk])
    client.force_login(alice)
    response = client.get(change)
    assert response.status_code == 200 and response.context["has_change_permission"] is False
    client.force_login(charlie)
    assert client.get(change).status_code == 404


def test_an_operator_sets_a_new_password_write_only(client, admin_user, alice_credential):
    change = reverse("admin:devices_devicecredential_change", args=[alice_credential.pk])
    client.force_login(admin_user)
    assert (
        client.post(change, {"password": "", "revoked_at_0": "", "revoked_at_1": ""}).status_code
        == 302
    )
    alice_credential.refresh_from_db()
    assert alice_credential.password.reveal() == "s3cret-broker-pass"  # blank keeps it
    assert (
        client.post(
            change, {"password": "n3w-pass", "revoked_at_0": "", "revoked_at_1": ""}
        ).status_code
        == 302
    )
    alice_credential.refresh_from_db()
    assert alice_credential.password.reveal() == "n3w-pass"


@pytest.mark.parametrize(
    ("model", "setting"),
    [
        ("telemetry", "TELEMETRY_RETENTION_DAYS"),
        ("transition", "HISTORY_RETENTION_DAYS"),
        ("command", "HISTORY_RETENTION_DAYS"),
        ("quarantinedmessage", "QUARANTINE_RETENTION_DAYS"),
    ],
)
def test_each_history_list_says_how_long_its_rows_are_kept(client, alice, model, setting, settings):
    # apps.core.retention deletes these rows after their setting's days: the list says so.
    url = reverse(f"admin:devices_{model}_changelist")
    client.force_login(alice)
    setattr(settings, setting, 42)
    page = client.get(url).content.decode()
    assert "Kept for 42 days: older rows are deleted automatically." in page

    setattr(settings, setting, 0)
    page = client.get(url).content.decode()
    assert "Kept without a time limit." in page
    assert "older rows are deleted" not in page
