"""What every simulated device is made of: its spec, the messages it emits and its host.

A simulated device is a plain object. It never touches a socket: it asks its `Host` (the
runner, or a fake in unit tests) to publish, to call it back later or to reboot it. That keeps
each profile module about its protocol only, and testable without a broker.

The profile modules implement SPEC §4 from the device side, independently of the platform's own
parsers in `apps.devices.profiles`: sharing code with the side under test would hide the very
mismatches the simulator exists to catch.
"""

from __future__ import annotations

import json
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    # What the message is, for the summary: "lwt" (online/offline presence, whatever the
    # profile calls its topic), "status", "telemetry", "ack", ...
    kind: str = ""


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device to simulate: from the database (`--owner`) or made up (`--count`)."""

    device_id: str
    profile: str
    topic: str = ""
    topic_order: str = "prefix"  # tasmota: "prefix" = cmnd/{topic}/…, "topic" = {topic}/cmnd/…
    relay_count: int = 1
    interval: float = 10.0  # seconds between periodic reports
    device_type: str = ""  # meter-v2: power_meter_dc | power_meter_ac
    phases: int = 3  # meter-v2 AC: 3 or 1
    energy: bool | None = None  # tasmota: has an energy monitor (None: single-relay plugs do)
    power: dict[str, str] = field(default_factory=dict)  # initial relay states {"1": "ON"}
    username: str = ""  # the device's own MQTT login, when the platform provisioned one
    password: str = ""

    @property
    def mqtt_topic(self) -> str:
        return self.topic or self.device_id


@dataclass(frozen=True, slots=True)
class DeviceOptions:
    """Behaviour knobs shared by all devices of a run."""

    qos: int = 1  # QoS of periodic reports and replies; lifecycle messages always use 1
    ts_format: str = "iso"  # meter-v2 envelope ts: "iso" (ISO 8601, ms, UTC) or "epoch_ms"
    hello_interval: float = 60.0  # meter-v2 heartbeat; 0 = hello only on (re)connect
    ota_step: float = 1.0  # seconds between OTA progress reports
    reboot_delay: float = 1.0  # seconds between a reboot/OTA ack and the connection drop


class Host(Protocol):
    """What a device may ask of the runner that drives it."""

    def publish(self, device: SimDevice, message: Message) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...

    def reboot(self, device: SimDevice) -> None:
        """Drop the device's connection without DISCONNECT (so its will fires), boot it
        again and reconnect it, as a real power cycle would."""


# Compact like the firmware and Tasmota; allow_nan=False so a NaN is never sent by accident
# (the fault injector sends them on purpose). One encoder: json.dumps would build one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode()


def iso_ms(epoch: float) -> str:
    """2025-01-31T12:00:00.123Z"""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class SimDevice(ABC):
    profile: ClassVar[str]

    def __init__(
        self,
        spec: DeviceSpec,
        host: Host,
        options: DeviceOptions | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.device_id = spec.device_id
        self.host = host
        self.options = options or DeviceOptions()
        self.rng = rng or random.Random()
        self.clock = clock
        self.interval = spec.interval
        self.booted_at = clock()
        self.boots = 0
        self.boot()

    # --- lifecycle, called by the runner ----------------------------------------------------
    def boot(self) -> None:
        """Power on: reset everything that lives for one boot only."""
        self.booted_at = self.clock()
        self.boots += 1

    @property
    def uptime(self) -> float:
        return max(0.0, self.clock() - self.booted_at)

    @property
    def client_id(self) -> str:
        return self.device_id

    @property
    def reports_per_tick(self) -> int:
        """How many messages one `report()` publishes (to spread a total rate fairly)."""
        return 1

    @abstractmethod
    def will(self) -> Message:
        """The MQTT will registered at connect: the broker publishes it if we vanish."""

    @abstractmethod
    def online(self) -> list[Message]:
        """Published after every successful connect."""

    @abstractmethod
    def offline(self) -> Message:
        """Published before a graceful DISCONNECT, which suppresses the will."""

    @abstractmethod
    def subscriptions(self) -> list[str]:
        """Topic filters this device listens on, for commands."""

    @abstractmethod
    def report(self) -> list[Message]:
        """The periodic report(s)."""

    @abstractmethod
    def handle(self, topic: str, payload: bytes) -> None:
        """A message arrived on one of `subscriptions()`: act, and publish the reply."""

    def skip_sequence(self, n: int) -> bool:
        """Fault injection: lose `n` sequence numbers. False when the profile has none."""
        return False

    # --- helpers ----------------------------------------------------------------------------
    def publish(self, message: Message) -> None:
        self.host.publish(self, message)

    def msg(self, topic: str, payload: bytes, kind: str, *, retain: bool = False) -> Message:
        # Retained messages describe state the platform rebuilds after a restart: always QoS 1.
        qos = 1 if retain else self.options.qos
        return Message(topic, payload, qos=qos, retain=retain, kind=kind)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.device_id}>"
