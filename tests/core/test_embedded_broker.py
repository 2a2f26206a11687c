"""The embedded MQTT broker, run as `make run` runs it: a real subprocess on a free port."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from apps.core.management.commands.embedded_broker import parse_bind
from apps.core.netcheck import mqtt_connack, wait_until

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_broker(port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "embedded_broker", "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def broker() -> Iterator[int]:
    port = free_port()
    proc = start_broker(port)
    try:
        if not wait_until(lambda: mqtt_connack(f"mqtt://127.0.0.1:{port}"), timeout=20):
            proc.kill()
            pytest.fail(f"embedded broker did not come up:\n{proc.communicate()[0]}")
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def connect(port: int, client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_it_delivers_a_retained_message_to_a_later_subscriber(broker: int) -> None:
    publisher = connect(broker, "test-pub")
    info = publisher.publish("home/broker-test-lamp/lwt", b"ONLINE", qos=1, retain=True)
    info.wait_for_publish(5)
    publisher.disconnect()
    publisher.loop_stop()

    received: list[mqtt.MQTTMessage] = []
    got = threading.Event()

    def on_message(client, userdata, message) -> None:
        received.append(message)
        got.set()

    subscriber = connect(broker, "test-sub")
    subscriber.on_message = on_message
    subscriber.subscribe("home/+/lwt", qos=1)
    try:
        assert got.wait(5), "the retained message never arrived"
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()
    assert received[0].topic == "home/broker-test-lamp/lwt"
    assert received[0].payload == b"ONLINE"
    assert received[0].retain


def test_it_stops_cleanly_on_sigterm() -> None:
    port = free_port()
    proc = start_broker(port)
    assert wait_until(lambda: mqtt_connack(f"mqtt://127.0.0.1:{port}"), timeout=20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not mqtt_connack(f"mqtt://127.0.0.1:{port}", timeout=0.5)


def test_it_exits_non_zero_when_the_port_is_taken() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proc = start_broker(port)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "could not start" in output
    assert "address already in use" in output


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mqtt://127.0.0.1:1884", ("127.0.0.1", 1884)),
        ("mqtt://user:secret@localhost", ("localhost", 1884)),
        ("192.0.2.7:1999", ("192.0.2.7", 1999)),
        ("[::1]:1884", ("::1", 1884)),
    ],
)
def test_it_reads_its_address_from_mqtt_url_or_bind(value: str, expected: tuple) -> None:
    assert parse_bind(value) == expected


@pytest.mark.parametrize("value", ["mqtts://broker:8883", "localhost", "host:port"])
def test_it_refuses_addresses_it_cannot_serve(value: str) -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        parse_bind(value)


def test_the_procfile_wait_returns_as_soon_as_the_broker_answers(broker: int) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/wait_for.py", "mqtt", f"mqtt://127.0.0.1:{broker}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
