"""Broker-login actions in the admin: platform operators only, real broker, no password shown."""

from __future__ import annotations

import pytest
from django.urls import reverse

from apps.devices.models import DeviceCredential

DEVICES = reverse("admin:devices_device_changelist")
CREDENTIALS = reverse("admin:devices_devicecredential_changelist")


def action_names(response) -> set[str]:
    return {value for value, _label in response.context["action_form"].fields["action"].choices}


@pytest.mark.django_db(transaction=True)
def test_an_operator_issues_then_rotates_then_revokes_logins(
    client, admin_user, alice_lamp, alice_meter, broker_settings, peers
):
    client.force_login(admin_user)
    selected = {"action": "issue_or_rotate", "_selected_action": [alice_lamp.pk, alice_meter.pk]}

    response = client.post(DEVICES, selected, follow=True)
    first = {c.device_id: c.password.reveal() for c in DeviceCredential.objects.all()}
    assert "credential issued: 2" in response.content.decode()
    lamp = peers(broker_settings, "alice-lamp-1", first[alice_lamp.pk])
    assert not lamp.connect().is_failure

    response = client.post(DEVICES, selected, follow=True)
    page = response.content.decode()
    assert "password rotated: 2" in page
    assert lamp.wait(lambda: lamp.disconnects)
    for password in first.values():
        assert password not in page
    second = {c.device_id: c.password.reveal() for c in DeviceCredential.objects.all()}
    assert all(second[pk] != first[pk] for pk in first)
    for password in second.values():
        assert password not in page

    credential = DeviceCredential.objects.get(device=alice_lamp)
    response = client.post(
        CREDENTIALS,
        {"action": "revoke_credentials", "_selected_action": [credential.pk]},
        follow=True,
    )
    assert "credential revoked: 1" in response.content.decode()
    assert peers(broker_settings, "alice-lamp-1", second[alice_lamp.pk]).connect().is_failure


@pytest.mark.django_db
def test_owners_do_not_get_broker_login_actions(client, alice, alice_lamp):
    client.force_login(alice)
    assert "issue_or_rotate" not in action_names(client.get(DEVICES))

    response = client.post(
        DEVICES, {"action": "issue_or_rotate", "_selected_action": [alice_lamp.pk]}
    )
    assert not DeviceCredential.objects.exists()
    assert response.status_code in (200, 302)


@pytest.mark.django_db
def test_an_unreachable_broker_changes_nothing(client, admin_user, alice_lamp, settings):
    settings.MQTT_ADMIN_PASSWORD = "x"
    settings.MQTT_ADMIN_URL = "mqtt://127.0.0.1:9"
    client.force_login(admin_user)

    response = client.post(
        DEVICES, {"action": "issue_or_rotate", "_selected_action": [alice_lamp.pk]}, follow=True
    )

    assert "Nothing changed: cannot reach the broker" in response.content.decode()
    assert not DeviceCredential.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_password_an_operator_types_in_goes_to_the_broker(
    client, admin_user, alice_lamp, broker_settings, peers
):
    client.force_login(admin_user)
    client.post(DEVICES, {"action": "issue_or_rotate", "_selected_action": [alice_lamp.pk]})
    credential = DeviceCredential.objects.get(device=alice_lamp)
    old = credential.password.reveal()
    url = reverse("admin:devices_devicecredential_change", args=[credential.pk])
    form = client.get(url).context["adminform"].form
    data = {name: "" for name in form.fields} | {"password": "typed-by-the-operator-1"}
    if "revoked_at" in form.fields:
        data |= {"revoked_at_0": "", "revoked_at_1": ""}

    response = client.post(url, data, follow=True)

    page = response.content.decode()
    assert "Broker login of alice-lamp-1: updated password of client alice-lamp-1" in page
    assert "typed-by-the-operator-1" not in page
    assert peers(broker_settings, "alice-lamp-1", old).connect().is_failure
    assert (
        not peers(broker_settings, "alice-lamp-1", "typed-by-the-operator-1").connect().is_failure
    )
