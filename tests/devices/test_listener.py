"""The listener against a real broker: Mosquitto in CI, the embedded broker otherwise."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from django.test import override_settings
from paho.mqtt.enums import CallbackAPIVersion

from apps.devices.listener import Listener
from apps.devices.models import Connection, Device, Profile, QuarantinedMessage, Telemetry
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def publisher(broker) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.fixture
def running_listener(mqtt_broker, transactional_db):
    with override_settings(MQTT_PROTOCOL=mqtt_broker.protocol):
        listener = Listener(
            url=mqtt_broker.url,
            group="",
            client_id=f"test-listener-{uuid.uuid4().hex[:8]}",
            batch_ms=20,
            sweep_every=3600,
        )
        thread = threading.Thread(target=listener.run, daemon=True)
        thread.start()
        assert listener.wait_connected(10)
        time.sleep(0.3)  # subscriptions granted
        yield listener
        listener.stop()
        thread.join(20)


def test_it_ingests_every_profile_and_quarantines_bad_input_without_stopping(
    running_listener, alice_owner, mqtt_broker
):
    uid = uuid.uuid4().hex[:6]
    lamp = Device.objects.create(
        owner=alice_owner, device_id=f"lamp-{uid}", profile=Profile.ESP32_LAMP
    )
    relay = Device.objects.create(
        owner=alice_owner,
        device_id=f"relay-{uid}",
        topic=f"tasmota_{uid}",
        profile=Profile.TASMOTA,
        relay_count=2,
    )
    meter = Device.objects.create(
        owner=alice_owner, device_id=f"meter-{uid}", profile=Profile.METER_V2
    )
    pub = publisher(mqtt_broker)
    pub.publish(
        f"home/{lamp.device_id}/status", json.dumps({"power": "OFF"}), qos=1
    ).wait_for_publish()
    pub.publish(f"home/{lamp.device_id}/status", b"\x00\xff{not json", qos=1).wait_for_publish()
    pub.publish(f"home/ghost-{uid}/status", json.dumps({"power": "ON"}), qos=1).wait_for_publish()
    pub.publish(f"home/{lamp.device_id}/status", b"x" * (70 * 1024), qos=1).wait_for_publish()
    pub.publish(f"{relay.topic}/stat/POWER2", "ON", qos=1).wait_for_publish()
    pub.publish(
        f"iot/{meter.device_id}/telemetry",
        json.dumps(
            {
                "v": 2,
                "seq": 1,
                "msg_type": "telemetry",
                "ts": 1795000000000,
                "data": {"voltage": 751.2, "current": 10.0},
            }
        ),
        qos=1,
    ).wait_for_publish()
    pub.publish(
        f"home/{lamp.device_id}/status", json.dumps({"power": "ON"}), qos=1
    ).wait_for_publish()

    wait_for(lambda: Device.objects.get(pk=lamp.pk).power == {"1": "ON"})
    ours = QuarantinedMessage.objects.filter(topic__contains=uid)  # the broker may be shared
    wait_for(lambda: ours.count() == 3)
    assert Device.objects.get(pk=relay.pk).power == {"2": "ON"}
    assert Device.objects.get(pk=relay.pk).topic_order == "topic"
    assert Device.objects.get(pk=meter.pk).last_reading["voltage"] == 751.2
    assert sorted(ours.values_list("reason", flat=True)) == [
        "malformed",
        "oversize",
        "unknown_device",
    ]
    assert Telemetry.objects.filter(device__owner=alice_owner).count() == 4
    pub.loop_stop()
    pub.disconnect()


def test_retained_connection_state_is_rebuilt_after_a_restart(
    mqtt_broker, transactional_db, alice_owner
):
    uid = uuid.uuid4().hex[:6]
    lamp = Device.objects.create(
        owner=alice_owner, device_id=f"lamp-{uid}", profile=Profile.ESP32_LAMP
    )
    pub = publisher(mqtt_broker)
    pub.publish(f"home/{lamp.device_id}/lwt", "ONLINE", qos=1, retain=True).wait_for_publish()
    try:
        with override_settings(MQTT_PROTOCOL=mqtt_broker.protocol):
            listener = Listener(
                url=mqtt_broker.url, group="", client_id=f"fresh-{uid}", sweep_every=3600
            )
            thread = threading.Thread(target=listener.run, daemon=True)
            thread.start()
            wait_for(lambda: Device.objects.get(pk=lamp.pk).connection == Connection.ONLINE)
            listener.stop()
            thread.join(20)
    finally:
        pub.publish(f"home/{lamp.device_id}/lwt", b"", qos=1, retain=True).wait_for_publish()
        pub.loop_stop()
        pub.disconnect()


def start_listener_process(broker, client_id: str) -> subprocess.Popen:
    env = subprocess_env(MQTT_URL=broker.url, MQTT_PROTOCOL=broker.protocol, MQTT_SHARED_GROUP="")
    return subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "mqtt_listen",
            "--client-id",
            client_id,
            "--no-live",
            "--batch-ms",
            "20",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_sigkill_during_a_qos1_burst_loses_nothing_acknowledged(
    private_mosquitto, transactional_db, alice_owner
):
    mqtt_broker = private_mosquitto
    uid = uuid.uuid4().hex[:6]
    meter = Device.objects.create(
        owner=alice_owner, device_id=f"meter-{uid}", profile=Profile.METER_V2
    )
    client_id = f"kill-test-{uid}"
    total = 4000

    proc = start_listener_process(mqtt_broker, client_id)
    try:
        wait_for(lambda: _listener_subscribed(mqtt_broker, meter.device_id), timeout=30)
        pub = publisher(mqtt_broker)
        published = threading.Event()

        def burst() -> None:
            for seq in range(1, total + 1):
                body = {
                    "v": 2,
                    "seq": seq,
                    "msg_type": "telemetry",
                    "ts": 1795000000000 + seq,
                    "data": {"voltage": 750.0, "power": float(seq)},
                }
                info = pub.publish(f"iot/{meter.device_id}/telemetry", json.dumps(body), qos=1)
                if seq % 100 == 0:
                    info.wait_for_publish(10)
                    time.sleep(0.1)  # a steady ~1,000 messages/s, so the kill lands mid-stream
            info.wait_for_publish(10)
            published.set()

        sender = threading.Thread(target=burst, daemon=True)
        sender.start()
        wait_for(lambda: Telemetry.objects.filter(device=meter).count() > total // 4, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert not published.is_set(), "the kill must land while messages are still published"
        proc = start_listener_process(mqtt_broker, client_id)
        assert published.wait(120)
        try:
            wait_for(lambda: Telemetry.objects.filter(device=meter).count() >= total, timeout=60)
        except AssertionError:
            count = Telemetry.objects.filter(device=meter).count()
            proc.send_signal(signal.SIGTERM)
            err = proc.communicate(timeout=20)[1].decode()[-3000:]
            raise AssertionError(f"{count} of {total} stored; listener said:\n{err}") from None
        time.sleep(1.0)  # anything redelivered after the commit must not add rows
        assert Telemetry.objects.filter(device=meter).count() == total
        seqs = set(Telemetry.objects.filter(device=meter).values_list("seq", flat=True))
        assert seqs == set(range(1, total + 1))
        pub.loop_stop()
        pub.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _listener_subscribed(broker, device_id: str) -> bool:
    """True once a probe message reaches the database: the listener is up and subscribed."""
    probe = mqtt.Client(CallbackAPIVersion.VERSION2)
    probe.connect(broker.host, broker.port)
    probe.loop_start()
    probe.publish(f"iot/{device_id}/status", "online", qos=1).wait_for_publish(5)
    probe.loop_stop()
    probe.disconnect()
    time.sleep(0.3)
    return Device.objects.get(device_id=device_id).connection == Connection.ONLINE


def test_sigterm_stops_the_listener_cleanly(mqtt_broker, transactional_db):
    proc = start_listener_process(mqtt_broker, f"term-{uuid.uuid4().hex[:6]}")
    seen = []
    for line in proc.stderr:  # wait until it is really running: connected to the broker
        seen.append(line)
        if b"event=connected" in line:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    rest = proc.stderr.read()
    assert b"event=stopped" in rest
    assert b"Traceback" not in b"".join(seen) + rest
