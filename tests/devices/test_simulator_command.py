"""`manage.py simulate_devices`: options, the owner mode, the summary, signals and errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from apps.devices.models import Device, Profile
from apps.owners.models import Owner
from tests.devices.simbroker import SimBroker
from tests.devices.simkit import Spy

ROOT = Path(__file__).resolve().parents[2]


def is_report(topic: str) -> bool:
    """A lamp status, a Tasmota STATE/SENSOR or meter telemetry (not a meter's presence)."""
    return topic.endswith(("/STATE", "/SENSOR", "/telemetry")) or (
        topic.startswith("home/") and topic.endswith("/status")
    )


@pytest.fixture(scope="module")
def embedded_broker():
    broker = SimBroker.embedded()
    yield broker
    broker.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request) -> SimBroker:
    if request.param == "mosquitto":
        return SimBroker.mosquitto()
    return request.getfixturevalue("embedded_broker")


@pytest.fixture
def uid() -> str:
    return "s" + uuid.uuid4().hex[:7]


def protocol_flag(broker: SimBroker) -> list[str]:
    # Explicit: settings.MQTT_PROTOCOL follows MQTT_URL (5 in CI), and amqtt speaks 3.1.1 only.
    return ["--protocol", "5" if broker.kind == "mosquitto" else "3.1.1"]


def run(*args: str) -> str:
    out = StringIO()
    call_command("simulate_devices", *args, stdout=out, stderr=StringIO())
    return out.getvalue().strip()


def test_synthetic_devices_publish_exactly_the_requested_reports(broker, uid):
    ids = [f"{uid}-lamp-00001", f"{uid}-tasmota-00002", f"{uid}-meter-00003", f"{uid}-lamp-00004"]
    spy = Spy(broker.host, broker.port, [f"+/{i}/+" for i in ids])
    try:
        summary = json.loads(
            run(
                "--count",
                "4",
                "--prefix",
                uid,
                "--messages",
                "40",
                "--rate",
                "0",
                "--hello-interval",
                "0",
                "--url",
                broker.url,
                "--json",
                *protocol_flag(broker),
            )
        )
        spy.wait(lambda s: sum(is_report(m.topic) for m in s.seen) >= 44)
    finally:
        spy.close()
    assert summary["periodic"] == 40
    assert summary["acknowledged"] == summary["sent"]
    assert set(summary["by_profile"]) == {"esp32-lamp", "tasmota", "meter-v2"}
    # Reports on the wire: the 40 periodic ones plus those sent on connect.
    kinds = summary["by_kind"]
    expected = sum(kinds.get(k, 0) for k in ("status", "state", "sensor", "telemetry"))
    assert expected >= 40
    assert sum(is_report(m.topic) for m in spy.seen) == expected


@pytest.mark.django_db
def test_owner_mode_plays_the_owners_devices_as_configured(broker, uid):
    owner = Owner.objects.create(name="Sim owner", slug=uid)
    lamp = Device.objects.create(
        owner=owner, device_id=f"{uid}-lamp", profile=Profile.ESP32_LAMP, power={"1": "ON"}
    )
    relay = Device.objects.create(
        owner=owner,
        device_id=f"{uid}-relay",
        profile=Profile.TASMOTA,
        topic=f"{uid}_R",
        topic_order="topic",
        relay_count=2,
    )
    meter = Device.objects.create(owner=owner, device_id=f"{uid}-meter", profile=Profile.METER_V2)
    spy = Spy(
        broker.host,
        broker.port,
        [
            f"home/{lamp.device_id}/status",
            f"{uid}_R/tele/STATE",
            f"iot/{meter.device_id}/telemetry",
        ],
    )
    try:
        line = run(
            "--owner",
            uid,
            "--interval",
            "0.05",
            "--messages",
            "30",
            "--url",
            broker.url,
            *protocol_flag(broker),
        )
        spy.wait(lambda s: len({m.topic for m in s.seen}) == 3)
    finally:
        spy.close()
    assert line.startswith("simulate_devices: ") and "meter-v2" in line and "tasmota" in line
    assert spy.on(f"home/{lamp.device_id}/status")[0].json()["power"] == "ON"  # from the database
    state = spy.on(f"{uid}_R/tele/STATE")[0].json()
    assert (state["POWER1"], state["POWER2"]) == ("OFF", "OFF")
    assert relay.device_id not in {m.topic.split("/")[0] for m in spy.seen}  # the topic, not the id


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --owner"),
        (["--owner", "x", "--count", "2"], "exactly one of --owner"),
        (["--owner", "nobody-here"], "no owner with slug"),
        (["--owner", "empty-owner"], "has no matching devices"),
        (["--count", "2", "--url", "http://127.0.0.1:1883"], "mqtt:// or mqtts://"),
        (["--count", "2", "--prefix", "Bad Prefix"], "prefix"),
        (["--count", "2", "--bad-rate", "2"], "--bad-rate"),
        (["--count", "2", "--rate", "-5"], "--rate"),
        (["--count", "2", "--messages", "0"], "--messages"),
        (["--count", "2", "--profile", "zigbee"], "--profile"),
    ],
)
def test_it_refuses_bad_options_with_a_clear_error(args, message):
    Owner.objects.create(name="Empty", slug="empty-owner")
    with pytest.raises(CommandError, match=message):
        run(*args)


@pytest.mark.parametrize("abrupt", [False, True], ids=["graceful", "abrupt"])
def test_sigterm_stops_it_and_the_devices_go_offline(embedded_broker, uid, abrupt):
    broker = embedded_broker
    lamp = f"{uid}-lamp-00001"
    spy = Spy(broker.host, broker.port, [f"home/{lamp}/#"])
    proc = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "simulate_devices",
            "--count",
            "1",
            "--prefix",
            uid,
            "--profile",
            "esp32-lamp",
            "--interval",
            "0.1",
            "--url",
            broker.url,
            *protocol_flag(broker),
            *(["--abrupt"] if abrupt else []),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        spy.wait_on(f"home/{lamp}/status", 2, timeout=30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        offline = spy.wait(
            lambda s: [m for m in s.on(f"home/{lamp}/lwt") if m.payload == b"OFFLINE"]
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        spy.close()
    assert proc.returncode == 0, err
    assert out.startswith("simulate_devices: ")
    assert offline
    assert ("goodbye" in json.dumps(out)) is False  # the summary line names profiles, not kinds


def test_it_fails_when_it_never_reaches_the_broker():
    from tests.devices.simbroker import free_port

    with pytest.raises(CommandError, match="never connected"):
        run("--count", "1", "--duration", "0.5", "--url", f"mqtt://127.0.0.1:{free_port()}")
