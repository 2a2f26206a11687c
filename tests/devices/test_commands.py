"""Commands on a real broker: QoS 1, never retained, confirmed from each profile's reports.

The broker is the real Mosquitto in CI (TEST_MOSQUITTO_URL), the embedded one elsewhere; a spy
subscriber sees what really went out. Confirmations go end to end through the listener's
`ingest_batch` (which calls `commands.after_ingest`), as a device's reply would.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from apps.devices import commands
from apps.devices.commands import CommandRefused, Issuer, execute_command, sweep
from apps.devices.ingest import DeviceDirectory, InboundMessage, ingest_batch
from apps.devices.models import (
    Command,
    CommandStatus,
    Connection,
    Device,
    IssuerType,
    OfflinePolicy,
    Profile,
)
from apps.devices.publisher import reset_publisher
from apps.owners.models import Membership, Role
from tests.schedules import spy as spying
from tests.schedules.spy import retained_on, unique

pytestmark = pytest.mark.django_db

# Fixtures shared with the schedule tests.
command_broker = spying.command_broker
spy = spying.spy


def device_reply(topic: str, payload, *, at: datetime | None = None):
    """A device's message, through the listener's batch ingest (and so `after_ingest`)."""
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    return ingest_batch(
        [InboundMessage(topic, payload.encode(), at or datetime.now(UTC))],
        directory=DeviceDirectory(),
    )


@pytest.fixture
def operator(django_user_model, alice_owner):
    user = django_user_model.objects.create_user("olga", "olga@example.com", "olga-pass-123")
    Membership.objects.create(owner=alice_owner, user=user, role=Role.OPERATOR)
    return user


@pytest.fixture
def lamp(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner,
        device_id=unique("lamp"),
        profile=Profile.ESP32_LAMP,
        connection=Connection.ONLINE,
    )


@pytest.fixture
def relay(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner,
        device_id=unique("relay"),
        topic=unique("tasmota"),
        profile=Profile.TASMOTA,
        relay_count=2,
        connection=Connection.ONLINE,
        power={"1": "OFF", "2": "OFF"},
    )


@pytest.fixture
def meter(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner,
        device_id=unique("meter"),
        profile=Profile.METER_V2,
        connection=Connection.ONLINE,
    )


def run(django_capture_on_commit_callbacks, **kwargs) -> Command:
    with django_capture_on_commit_callbacks(execute=True):
        return execute_command(**kwargs)


# --- publishing ---------------------------------------------------------------------------------


def test_esp32_command_goes_out_qos1_unretained_with_its_request_id(
    spy, command_broker, lamp, alice, django_capture_on_commit_callbacks
):
    command = run(django_capture_on_commit_callbacks, device=lamp, action="off", issuer=alice)

    assert command.status == CommandStatus.PUBLISHED
    [seen] = spy.wait_for(f"home/{lamp.device_id}/cmd")
    assert seen.qos == 1 and seen.retain is False
    assert seen.json() == {
        "deviceId": lamp.device_id,
        "action": "OFF",
        "requestId": str(command.request_id),
    }
    row = Command.objects.get(pk=command.pk)
    assert row.issuer_type == IssuerType.USER and row.issuer_label == "alice"
    assert row.published_at and row.confirm_by > row.published_at
    assert row.expires_at > row.issued_at
    # A device that connects later must not find the command waiting for it.
    assert retained_on(command_broker.url, seen.topic, command_broker.protocol) == []


def test_tasmota_command_uses_relay_index_and_the_devices_topic_order(
    spy, relay, alice, django_capture_on_commit_callbacks
):
    run(django_capture_on_commit_callbacks, device=relay, action="ON", relay=2, issuer=alice)
    relay.topic_order = "topic"
    relay.save()
    run(django_capture_on_commit_callbacks, device=relay, action="TOGGLE", relay=1, issuer=alice)

    [first] = spy.wait_for(f"cmnd/{relay.topic}/POWER2")
    [second] = spy.wait_for(f"{relay.topic}/cmnd/POWER1")
    assert (first.payload, second.payload) == (b"ON", b"TOGGLE")
    assert first.retain is False and second.retain is False


def test_meter_named_command_carries_the_v2_envelope(
    spy, meter, alice, django_capture_on_commit_callbacks
):
    command = run(
        django_capture_on_commit_callbacks,
        device=meter,
        action="set_interval",
        params={"seconds": 5},
        issuer=alice,
    )
    [seen] = spy.wait_for(f"iot/{meter.device_id}/command")
    assert seen.json() == {
        "v": 2,
        "command_id": str(command.request_id),
        "name": "set_interval",
        "params": {"seconds": 5},
    }


def test_an_unreachable_broker_fails_the_command_with_the_reason(
    settings, lamp, alice, django_capture_on_commit_callbacks
):
    from tests.conftest import free_port

    settings.MQTT_URL = f"mqtt://127.0.0.1:{free_port()}"
    settings.COMMAND_PUBLISH_TIMEOUT = 0.5
    reset_publisher()
    try:
        command = run(django_capture_on_commit_callbacks, device=lamp, action="ON", issuer=alice)
    finally:
        reset_publisher()
    assert command.status == CommandStatus.FAILED
    assert "not connected" in Command.objects.get(pk=command.pk).detail


# --- confirmation -------------------------------------------------------------------------------


def test_esp32_status_echoing_the_request_id_confirms(
    spy, lamp, alice, django_capture_on_commit_callbacks
):
    command = run(django_capture_on_commit_callbacks, device=lamp, action="ON", issuer=alice)
    spy.wait_for(f"home/{lamp.device_id}/cmd")

    device_reply(
        f"home/{lamp.device_id}/status",
        {"deviceId": lamp.device_id, "power": "ON", "requestId": str(command.request_id)},
    )

    row = Command.objects.get(pk=command.pk)
    assert row.status == CommandStatus.CONFIRMED and row.resolved_at >= row.published_at


def test_esp32_status_without_the_request_id_does_not_confirm(
    spy, lamp, alice, django_capture_on_commit_callbacks
):
    command = run(django_capture_on_commit_callbacks, device=lamp, action="ON", issuer=alice)
    device_reply(f"home/{lamp.device_id}/status", {"deviceId": lamp.device_id, "power": "ON"})
    assert Command.objects.get(pk=command.pk).status == CommandStatus.PUBLISHED


def test_a_device_cannot_confirm_another_devices_command(
    spy, lamp, alice_owner, alice, django_capture_on_commit_callbacks
):
    other = Device.objects.create(
        owner=alice_owner,
        device_id=unique("lamp"),
        profile=Profile.ESP32_LAMP,
        connection=Connection.ONLINE,
    )
    command = run(django_capture_on_commit_callbacks, device=lamp, action="ON", issuer=alice)
    device_reply(
        f"home/{other.device_id}/status", {"power": "ON", "requestId": str(command.request_id)}
    )
    assert Command.objects.get(pk=command.pk).status == CommandStatus.PUBLISHED


@pytest.mark.parametrize("order", ["prefix", "topic"])
def test_tasmota_stat_power_confirms_by_reported_state(
    order, spy, relay, alice, django_capture_on_commit_callbacks
):
    relay.topic_order = order
    relay.save()
    command = run(
        django_capture_on_commit_callbacks, device=relay, action="ON", relay=2, issuer=alice
    )
    stat = f"stat/{relay.topic}/POWER2" if order == "prefix" else f"{relay.topic}/stat/POWER2"

    device_reply(stat.replace("POWER2", "POWER1"), "ON")  # the other relay: not ours
    assert Command.objects.get(pk=command.pk).status == CommandStatus.PUBLISHED
    device_reply(stat, "ON")
    assert Command.objects.get(pk=command.pk).status == CommandStatus.CONFIRMED


def test_tasmota_result_confirms_and_a_wrong_state_does_not(
    spy, relay, alice, django_capture_on_commit_callbacks
):
    command = run(
        django_capture_on_commit_callbacks, device=relay, action="ON", relay=1, issuer=alice
    )
    device_reply(f"stat/{relay.topic}/RESULT", {"POWER1": "OFF"})
    assert Command.objects.get(pk=command.pk).status == CommandStatus.PUBLISHED
    device_reply(f"stat/{relay.topic}/RESULT", {"POWER1": "ON"})
    assert Command.objects.get(pk=command.pk).status == CommandStatus.CONFIRMED


def test_tasmota_toggle_expects_the_opposite_of_the_known_state(
    spy, relay, alice, django_capture_on_commit_callbacks
):
    command = run(
        django_capture_on_commit_callbacks, device=relay, action="TOGGLE", relay=1, issuer=alice
    )
    assert command.expected == "ON"  # relay 1 was OFF
    device_reply(f"stat/{relay.topic}/RESULT", {"POWER": "ON"})
    assert Command.objects.get(pk=command.pk).status == CommandStatus.CONFIRMED


def test_a_state_report_from_before_the_command_does_not_confirm_it(
    spy, relay, alice, django_capture_on_commit_callbacks
):
    command = run(
        django_capture_on_commit_callbacks, device=relay, action="ON", relay=1, issuer=alice
    )
    old = command.published_at - timedelta(seconds=30)
    device_reply(f"stat/{relay.topic}/POWER", "ON", at=old)
    assert Command.objects.get(pk=command.pk).status == CommandStatus.PUBLISHED


def test_meter_ack_ok_confirms_and_ack_error_fails_with_the_devices_detail(
    spy, meter, alice, django_capture_on_commit_callbacks
):
    ok = run(django_capture_on_commit_callbacks, device=meter, action="reboot", issuer=alice)
    bad = run(django_capture_on_commit_callbacks, device=meter, action="calibrate", issuer=alice)
    ack = {"v": 2, "seq": 1, "msg_type": "command_ack", "ts": "2026-11-22T10:00:00Z"}

    device_reply(
        f"iot/{meter.device_id}/command/ack",
        {**ack, "command_id": str(ok.request_id), "status": "ok"},
    )
    device_reply(
        f"iot/{meter.device_id}/command/ack",
        {
            **ack,
            "seq": 2,
            "command_id": str(bad.request_id),
            "status": "error",
            "detail": "no reference load",
        },
    )

    assert Command.objects.get(pk=ok.pk).status == CommandStatus.CONFIRMED
    failed = Command.objects.get(pk=bad.pk)
    assert failed.status == CommandStatus.FAILED and "no reference load" in failed.detail


def test_a_silent_device_leaves_the_command_unconfirmed_and_a_late_echo_still_confirms(
    spy, lamp, alice, django_capture_on_commit_callbacks
):
    command = run(django_capture_on_commit_callbacks, device=lamp, action="ON", issuer=alice)

    assert sweep(now=command.confirm_by - timedelta(seconds=1)).unconfirmed == 0
    assert sweep(now=command.confirm_by + timedelta(seconds=1)).unconfirmed == 1
    assert Command.objects.get(pk=command.pk).status == CommandStatus.UNCONFIRMED

    device_reply(
        f"home/{lamp.device_id}/status", {"power": "ON", "requestId": str(command.request_id)}
    )
    assert Command.objects.get(pk=command.pk).status == CommandStatus.CONFIRMED


def test_a_pending_row_left_by_a_dead_publisher_is_never_published_again(lamp, alice):
    command = commands.build_command(lamp, "ON", issuer=Issuer.for_user(alice))
    command.save()  # written, then the process died before publishing
    later = command.issued_at + timedelta(minutes=5)
    assert sweep(now=later).unconfirmed == 1
    row = Command.objects.get(pk=command.pk)
    assert row.status == CommandStatus.UNCONFIRMED and "stopped" in row.detail


# --- offline devices ------------------------------------------------------------------------------


def test_an_offline_device_with_the_reject_policy_refuses(lamp, alice):
    Device.objects.filter(pk=lamp.pk).update(connection=Connection.OFFLINE)
    with pytest.raises(CommandRefused) as refused:
        execute_command(device=lamp, action="ON", issuer=alice)
    assert refused.value.code == CommandRefused.OFFLINE
    assert not Command.objects.exists()


def test_a_held_command_is_sent_when_the_device_comes_back_online(
    spy, lamp, alice, django_capture_on_commit_callbacks, monkeypatch
):
    Device.objects.filter(pk=lamp.pk).update(
        connection=Connection.OFFLINE, offline_policy=OfflinePolicy.QUEUE
    )
    command = run(django_capture_on_commit_callbacks, device=lamp, action="ON", issuer=alice)
    assert command.status == CommandStatus.QUEUED
    assert spy.settle(f"home/{lamp.device_id}/cmd", quiet=0.3) == []

    enqueued = []
    monkeypatch.setattr(commands, "_enqueue_send_held", enqueued.append)
    with django_capture_on_commit_callbacks(execute=True):
        device_reply(f"home/{lamp.device_id}/lwt", "ONLINE")
    assert enqueued == [[lamp.pk]]

    assert commands.send_held_commands(enqueued[0]) == 1
    assert commands.send_held_commands(enqueued[0]) == 0  # claimed once
    [seen] = spy.wait_for(f"home/{lamp.device_id}/cmd")
    assert seen.json()["requestId"] == str(command.request_id)
    assert Command.objects.get(pk=command.pk).status == CommandStatus.PUBLISHED


def test_a_held_command_expires_when_the_device_stays_offline(spy, lamp, alice):
    Device.objects.filter(pk=lamp.pk).update(
        connection=Connection.OFFLINE, offline_policy=OfflinePolicy.QUEUE
    )
    command = execute_command(device=lamp, action="ON", issuer=alice, ttl=60)
    assert sweep(now=command.issued_at + timedelta(seconds=59)).expired == 0
    assert sweep(now=command.issued_at + timedelta(seconds=61)).expired == 1
    assert Command.objects.get(pk=command.pk).status == CommandStatus.EXPIRED
    Device.objects.filter(pk=lamp.pk).update(connection=Connection.ONLINE)
    assert sweep().sent == 0
    assert spy.settle(f"home/{lamp.device_id}/cmd", quiet=0.3) == []


# --- who may switch -----------------------------------------------------------------------------


def test_a_viewer_cannot_switch(lamp, bob):
    with pytest.raises(CommandRefused) as refused:
        execute_command(device=lamp, action="ON", issuer=bob)
    assert refused.value.code == CommandRefused.FORBIDDEN
    assert not Command.objects.exists()


def test_an_operator_can_switch(spy, lamp, operator, django_capture_on_commit_callbacks):
    command = run(django_capture_on_commit_callbacks, device=lamp, action="ON", issuer=operator)
    assert command.status == CommandStatus.PUBLISHED


def test_charlie_cannot_switch_alices_lamp(lamp, charlie):
    with pytest.raises(CommandRefused) as refused:
        execute_command(device=lamp, action="OFF", issuer=charlie)
    assert refused.value.code == CommandRefused.FORBIDDEN


def test_an_api_key_or_schedule_of_another_owner_cannot_switch(lamp, charlie_owner):
    key = Issuer.for_api_key(key_id=7, label="charlie-ci", owner_id=charlie_owner.pk)
    with pytest.raises(CommandRefused):
        execute_command(device=lamp, action="OFF", issuer=key)
    assert not Command.objects.exists()


@pytest.mark.parametrize(
    ("profile", "action", "relay", "params", "message"),
    [
        (Profile.TASMOTA, "ON", 3, None, "Relay must be between 1 and 2"),
        (Profile.TASMOTA, "BLINK", None, None, "Action must be one of"),
        (Profile.ESP32_LAMP, "ON", None, {"x": 1}, "take no parameters"),
        (Profile.METER_V2, "ON", None, None, "named commands"),
        (Profile.METER_V2, "reboot", 1, None, "no relays"),
        (Profile.METER_V2, "reboot", None, {"blob": "x" * 5000}, "too large"),
    ],
)
def test_invalid_commands_are_refused_with_a_clear_message(
    alice_owner, alice, profile, action, relay, params, message
):
    device = Device.objects.create(
        owner=alice_owner, device_id=unique("dev"), profile=profile, relay_count=2
    )
    with pytest.raises(CommandRefused) as refused:
        execute_command(device=device, action=action, relay=relay, params=params, issuer=alice)
    assert refused.value.code == CommandRefused.INVALID and message in refused.value.message


def test_command_results_are_pushed_to_the_owners_pages(
    spy, lamp, alice, settings, django_capture_on_commit_callbacks
):
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(f"owner.{lamp.owner_id}", channel)

    command = run(django_capture_on_commit_callbacks, device=lamp, action="ON", issuer=alice)
    pushed = async_to_sync(layer.receive)(channel)
    assert pushed["owner_id"] == lamp.owner_id
    [message] = pushed["payloads"]
    assert message == {
        "type": "command",
        "device": lamp.device_id,
        "command_id": str(command.request_id),
        "action": "ON",
        "relay": 1,
        "status": "published",
        "detail": "",
    }
    assert timezone.now() >= command.published_at
