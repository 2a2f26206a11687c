"""A spy on the broker: a plain MQTT subscriber recording every command the platform publishes.

Tests look at what really reached the broker (topic, payload, QoS, retain flag, arrival time),
never at what the code under test says it sent.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from apps.devices.mqtt import mqtt_params
from apps.devices.publisher import reset_publisher

COMMAND_TOPICS = ["home/+/cmd", "cmnd/+/+", "+/cmnd/+", "iot/+/command"]


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float  # time.time() on arrival

    def json(self) -> Any:
        return json.loads(self.payload)


class Spy:
    def __init__(self, url: str, topics: list[str] | None = None, protocol: str = "3.1.1") -> None:
        self.messages: list[Seen] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        params = mqtt_params(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"spy-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        if params["username"]:
            self.client.username_pw_set(params["username"], params["password"])
        self.topics = topics or COMMAND_TOPICS
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a, **k: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(params["host"], params["port"])
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("spy could not subscribe")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        seen = Seen(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), time.time())
        with self._lock:
            self.messages.append(seen)

    def on(self, prefix: str) -> list[Seen]:
        """Messages whose topic contains `prefix` (tests use unique device ids)."""
        with self._lock:
            return [m for m in self.messages if prefix in m.topic]

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 10.0) -> list[Seen]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.on(prefix)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        return self.on(prefix)

    def settle(self, prefix: str, quiet: float = 0.5, timeout: float = 10.0) -> list[Seen]:
        """Wait until no new message for `prefix` arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            n = len(self.on(prefix))
            if n == last:
                return self.on(prefix)
            last = n
            time.sleep(quiet)
        return self.on(prefix)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_on(url: str, topic: str, protocol: str = "3.1.1", wait: float = 1.0) -> list[Seen]:
    """What a brand-new subscriber receives on `topic`: only retained messages can arrive."""
    spy = Spy(url, [topic], protocol)
    time.sleep(wait)
    spy.close()
    return spy.messages


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def command_broker(mqtt_broker, settings) -> Iterator[Any]:
    """Point the platform's command publisher at the test broker (Mosquitto in CI)."""
    settings.MQTT_URL = mqtt_broker.url
    settings.MQTT_PROTOCOL = mqtt_broker.protocol
    reset_publisher()
    yield mqtt_broker
    reset_publisher()


@pytest.fixture
def spy(command_broker) -> Iterator[Spy]:
    s = Spy(command_broker.url, protocol=command_broker.protocol)
    yield s
    s.close()
