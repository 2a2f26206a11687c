"""Helpers for the simulator tests: a fake host with a fake clock, and a spy subscriber."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from apps.devices.simulator.base import DeviceOptions, DeviceSpec, Message, SimDevice


class FakeHost:
    """Stands in for the runner: records publishes, runs timers on a fake clock."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.now = start
        self.published: list[Message] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.reboots: list[SimDevice] = []

    def clock(self) -> float:
        return self.now

    def publish(self, device: SimDevice, message: Message) -> None:
        self.published.append(message)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((self.now + delay, callback))

    def reboot(self, device: SimDevice) -> None:
        self.reboots.append(device)
        device.boot()

    def advance(self, seconds: float) -> None:
        """Move the clock, running the timers that fall due on the way, in order."""
        until = self.now + seconds
        while True:
            due = sorted((t for t in self.timers if t[0] <= until), key=lambda t: t[0])
            if not due:
                break
            when, callback = due[0]
            self.timers.remove(due[0])
            self.now = max(self.now, when)
            callback()
        self.now = until

    def take(self) -> list[Message]:
        out, self.published = self.published, []
        return out


def make(cls: type[SimDevice], host: FakeHost, **spec: Any) -> SimDevice:
    options = spec.pop("options", DeviceOptions(ota_step=1.0, reboot_delay=0.5))
    spec.setdefault("device_id", f"t-{uuid.uuid4().hex[:8]}")
    spec.setdefault("profile", cls.profile)
    return cls(DeviceSpec(**spec), host, options, clock=host.clock)


def body(message: Message) -> Any:
    return json.loads(message.payload)


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool
    qos: int

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def text(self) -> str:
        return self.payload.decode()


class Spy:
    """A plain MQTT client on the real broker: what it receives is what devices really sent."""

    def __init__(self, host: str, port: int, topics: list[str]) -> None:
        self.seen: list[Seen] = []
        self.topics = topics
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"spy-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("spy could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # amqtt 0.12 also sends a new client retained messages matching other clients'
        # subscriptions: keep only what this spy asked for.
        if not any(mqtt.topic_matches_sub(t, msg.topic) for t in self.topics):
            return
        with self._lock:
            self.seen.append(Seen(msg.topic, msg.payload, bool(msg.retain), msg.qos))

    def on(self, topic: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.topic == topic]

    def wait(self, predicate: Callable[[Spy], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate(self)
            if result:
                return result
            time.sleep(0.02)
        with self._lock:
            topics = sorted({s.topic for s in self.seen})
        raise AssertionError(f"condition not met within {timeout}s; topics seen: {topics}")

    def wait_on(self, topic: str, count: int = 1, timeout: float = 10.0) -> list[Seen]:
        return self.wait(lambda s: len(s.on(topic)) >= count and s.on(topic), timeout)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
