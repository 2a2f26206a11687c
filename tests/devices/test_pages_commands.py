"""The live pages' command endpoint: operators switch relays; nobody else changes anything.

Commands go to a real broker (Mosquitto in CI, the embedded one elsewhere) and a spy
subscriber checks what really went out.
"""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from apps.devices.models import Command, CommandStatus, Connection, Device, Profile
from apps.owners.models import Membership, Role
from tests.schedules import spy as spying
from tests.schedules.spy import unique

pytestmark = pytest.mark.django_db

command_broker = spying.command_broker
spy = spying.spy


@pytest.fixture(autouse=True)
def _memory_layer(settings):
    # The live push of command results is tested in test_live_socket; here it only must not fail.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


@pytest.fixture
def lamp(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner,
        device_id=unique("lamp"),
        profile=Profile.ESP32_LAMP,
        connection=Connection.ONLINE,
        power={"1": "OFF"},
    )


def post(client: Client, device: Device, body: dict | str) -> object:
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(
        reverse("device-command", args=[device.device_id]), data, content_type="application/json"
    )


# Committed for real, as in production: the answer comes after the broker's PUBACK.
@pytest.mark.django_db(transaction=True)
def test_an_owner_switches_a_lamp_and_the_command_goes_out(client, alice, lamp, spy):
    client.force_login(alice)

    response = post(client, lamp, {"action": "ON", "relay": 1})

    assert response.status_code == 202
    body = response.json()
    command = Command.objects.get(device=lamp)
    assert body["command_id"] == str(command.request_id)
    assert body["status"] == CommandStatus.PUBLISHED == Command.objects.get().status
    [sent] = spy.wait_for(lamp.device_id)
    assert sent.topic == f"home/{lamp.device_id}/cmd"
    assert sent.json()["action"] == "ON" and sent.json()["requestId"] == body["command_id"]


def test_an_operator_may_switch(client, django_user_model, alice_owner, lamp, command_broker):
    olga = django_user_model.objects.create_user("olga", "olga@example.com", "olga-pass-123")
    Membership.objects.create(owner=alice_owner, user=olga, role=Role.OPERATOR)
    client.force_login(olga)

    assert post(client, lamp, {"action": "TOGGLE", "relay": 1}).status_code == 202


def test_a_viewer_is_refused_and_nothing_is_logged(client, bob, lamp):
    client.force_login(bob)

    response = post(client, lamp, {"action": "ON", "relay": 1})

    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    assert not Command.objects.exists()


def test_charlie_gets_404_for_alices_lamp_and_nothing_is_logged(client, charlie, lamp):
    client.force_login(charlie)

    assert post(client, lamp, {"action": "OFF", "relay": 1}).status_code == 404
    assert not Command.objects.exists()


def test_anonymous_posts_are_sent_to_login(client, lamp):
    response = post(client, lamp, {"action": "OFF"})

    assert response.status_code == 302
    assert not Command.objects.exists()


def test_a_post_without_the_csrf_token_is_refused(alice, lamp):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)

    assert post(client, lamp, {"action": "ON", "relay": 1}).status_code == 403
    assert not Command.objects.exists()


def test_get_is_not_allowed(client, alice, lamp):
    client.force_login(alice)

    assert client.get(reverse("device-command", args=[lamp.device_id])).status_code == 405


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"action": "BLINK", "relay": 1}, "Action must be one of"),
        ({"action": "ON", "relay": "two"}, "Relay must be a number"),
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_invalid_requests_get_400_with_a_reason(client, alice, lamp, body, message):
    client.force_login(alice)

    response = post(client, lamp, body)

    assert response.status_code == 400
    assert message in response.json()["detail"]
    assert not Command.objects.exists()


def test_an_offline_lamp_that_refuses_commands_answers_409(client, alice, lamp):
    Device.objects.filter(pk=lamp.pk).update(connection=Connection.OFFLINE)
    client.force_login(alice)

    response = post(client, lamp, {"action": "ON", "relay": 1})

    assert response.status_code == 409
    assert response.json()["error"] == "offline"


def test_buttons_are_shown_to_operators_and_not_to_viewers(client, alice, bob, lamp):
    page = reverse("device-detail", args=[lamp.device_id])
    client.force_login(alice)
    assert 'class="cmd" data-action="ON"' in client.get(page).content.decode()

    client.force_login(bob)
    html = client.get(page).content.decode()
    assert 'class="cmd"' not in html.split('id="relay-template"')[0]
