"""Commands end to end: platform -> broker -> a device that answers as its firmware does ->
broker -> the real listener (`Listener`, in a thread) -> `after_ingest` -> confirmed.

The devices are small paho clients speaking each profile's contract (SPEC §4): the ESP32 lamp
echoes `requestId` in its status, Tasmota answers `stat/<topic>/POWERn` and `RESULT`, the
meter acks on `iot/<id>/command/ack`. A silent device leaves its command unconfirmed.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from django.test import override_settings
from paho.mqtt.enums import CallbackAPIVersion

from apps.devices.commands import execute_command, sweep
from apps.devices.listener import Listener
from apps.devices.models import Command, CommandStatus, Connection, Device, Profile
from apps.devices.mqtt import mqtt_params
from apps.schedules import actions
from apps.schedules.models import RunStatus, Schedule, ScheduleRun
from tests.schedules import spy as spying
from tests.schedules.spy import unique

pytestmark = pytest.mark.django_db(transaction=True)

command_broker = spying.command_broker

Reply = Callable[[str, bytes], list[tuple[str, bytes]]]


class FakeDevice:
    """Subscribes to its command topic and answers with `reply(topic, payload)`."""

    def __init__(self, broker, topic: str, reply: Reply) -> None:
        self.received: list[bytes] = []
        params = mqtt_params(broker.url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:8]}"
        )
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()

        def on_message(client, userdata, msg) -> None:
            self.received.append(bytes(msg.payload))
            for out_topic, out_payload in reply(msg.topic, bytes(msg.payload)):
                client.publish(out_topic, out_payload, qos=1)

        self.client.on_message = on_message
        self.client.connect(params["host"], params["port"])
        self.client.loop_start()
        assert subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def listener(command_broker) -> Iterator[Listener]:
    with override_settings(MQTT_PROTOCOL=command_broker.protocol):
        running = Listener(
            url=command_broker.url,
            group="",
            client_id=f"e2e-{uuid.uuid4().hex[:8]}",
            batch_ms=20,
            sweep_every=3600,
        )
        thread = threading.Thread(target=running.run, daemon=True)
        thread.start()
        assert running.wait_connected(10)
        time.sleep(0.3)  # subscriptions granted
        yield running
        running.stop()
        thread.join(20)


@pytest.fixture
def devices() -> Iterator[list[FakeDevice]]:
    started: list[FakeDevice] = []
    yield started
    for device in started:
        device.close()


def wait_status(command: Command, status: str, timeout: float = 10.0) -> Command:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = Command.objects.get(pk=command.pk)
        if row.status == status:
            return row
        time.sleep(0.05)
    raise AssertionError(f"command stayed {Command.objects.get(pk=command.pk).status}")


def test_esp32_lamp_confirms_by_echoing_the_request_id(
    command_broker, listener, devices, alice_owner, alice
):
    lamp = Device.objects.create(
        owner=alice_owner,
        device_id=unique("e2e-lamp"),
        profile=Profile.ESP32_LAMP,
        connection=Connection.ONLINE,
    )

    def firmware(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        body = json.loads(payload)
        status = {
            "deviceId": lamp.device_id,
            "power": body["action"],
            "requestId": body["requestId"],
        }
        return [(f"home/{lamp.device_id}/status", json.dumps(status).encode())]

    devices.append(FakeDevice(command_broker, f"home/{lamp.device_id}/cmd", firmware))
    command = execute_command(device=lamp, action="OFF", issuer=alice)

    confirmed = wait_status(command, CommandStatus.CONFIRMED)
    assert confirmed.resolved_at >= confirmed.published_at
    assert Device.objects.get(pk=lamp.pk).power == {"1": "OFF"}


@pytest.mark.parametrize("answer", ["POWER", "RESULT"])
def test_tasmota_confirms_by_reporting_the_relay_state(
    answer, command_broker, listener, devices, alice_owner, alice
):
    relay = Device.objects.create(
        owner=alice_owner,
        device_id=unique("e2e-relay"),
        topic=unique("e2e-tas"),
        profile=Profile.TASMOTA,
        relay_count=2,
        connection=Connection.ONLINE,
    )

    def tasmota(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        command = topic.rsplit("/", 1)[1]  # POWER2
        if answer == "POWER":
            return [(f"stat/{relay.topic}/{command}", payload)]
        return [(f"stat/{relay.topic}/RESULT", json.dumps({command: payload.decode()}).encode())]

    devices.append(FakeDevice(command_broker, f"cmnd/{relay.topic}/+", tasmota))
    command = execute_command(device=relay, action="ON", relay=2, issuer=alice)

    wait_status(command, CommandStatus.CONFIRMED)
    assert Device.objects.get(pk=relay.pk).power.get("2") == "ON"


def test_meter_confirms_with_its_ack(command_broker, listener, devices, alice_owner, alice):
    meter = Device.objects.create(
        owner=alice_owner,
        device_id=unique("e2e-meter"),
        profile=Profile.METER_V2,
        connection=Connection.ONLINE,
    )
    seq = iter(range(1, 100))

    def meter_fw(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        body = json.loads(payload)
        ack = {
            "v": 2,
            "seq": next(seq),
            "msg_type": "command_ack",
            "ts": int(time.time() * 1000),
            "command_id": body["command_id"],
            "status": "ok",
        }
        return [(f"iot/{meter.device_id}/command/ack", json.dumps(ack).encode())]

    devices.append(FakeDevice(command_broker, f"iot/{meter.device_id}/command", meter_fw))
    command = execute_command(device=meter, action="reboot", issuer=alice)
    wait_status(command, CommandStatus.CONFIRMED)


def test_a_silent_lamp_leaves_its_command_unconfirmed(
    command_broker, listener, devices, alice_owner, alice, settings
):
    settings.COMMAND_CONFIRM_SECONDS = 1
    lamp = Device.objects.create(
        owner=alice_owner,
        device_id=unique("e2e-silent"),
        profile=Profile.ESP32_LAMP,
        connection=Connection.ONLINE,
    )
    deaf = FakeDevice(command_broker, f"home/{lamp.device_id}/cmd", lambda t, p: [])
    devices.append(deaf)
    command = execute_command(device=lamp, action="ON", issuer=alice)
    time.sleep(1.5)
    sweep()
    assert Command.objects.get(pk=command.pk).status == CommandStatus.UNCONFIRMED
    assert len(deaf.received) == 1  # it did arrive; the device just never said so


def test_a_scheduled_run_is_confirmed_by_the_lamp(command_broker, listener, devices, alice_owner):
    from django.utils import timezone

    lamp = Device.objects.create(
        owner=alice_owner,
        device_id=unique("e2e-sched"),
        profile=Profile.ESP32_LAMP,
        connection=Connection.ONLINE,
    )

    def firmware(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        body = json.loads(payload)
        status = {"power": body["action"], "requestId": body["requestId"]}
        return [(f"home/{lamp.device_id}/status", json.dumps(status).encode())]

    devices.append(FakeDevice(command_broker, f"home/{lamp.device_id}/cmd", firmware))
    planned = timezone.now().replace(second=0, microsecond=0)
    Schedule.objects.create(
        owner=alice_owner,
        name="now",
        device=lamp,
        action="ON",
        cron=f"{planned.minute} {planned.hour} * * *",  # next run a day away
        timezone="UTC",
        next_run_at=planned,
    )
    assert actions.run_due_schedules().published == 1
    run = ScheduleRun.objects.get()
    assert run.status == RunStatus.PUBLISHED
    wait_status(run.command, CommandStatus.CONFIRMED)
