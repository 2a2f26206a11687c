"""`tasmota`: off-the-shelf Tasmota firmware, both FullTopic orders, POWER1..8. SPEC §4.2.

Real Tasmota payloads vary by version and module, so parsing takes what it recognises and keeps
the whole payload. Tasmota topics that are legitimate but outside our contract (STATUSn, INFOn,
UPGRADE, …) are accepted as a sign of life and otherwise ignored, not quarantined.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .base import (
    FOREIGN_TOPIC,
    INVALID,
    DeviceProfile,
    Parsed,
    Reject,
    load_object,
    on_off,
    optional_int,
    optional_text,
    text,
)

POWER_RE = re.compile(r"^POWER([1-8])?$")
COMMAND_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")
STAT_CHANNELS = {"RESULT"}
TELE_CHANNELS = {"STATE", "SENSOR", "LWT"}
PREFIXES = ("stat", "tele")
# Values of apps.devices.models.TasmotaTopicOrder (profiles stay free of ORM imports).
PREFIX_FIRST, TOPIC_FIRST = "prefix", "topic"


def _relay(key: str) -> str | None:
    m = POWER_RE.match(key)
    if not m:
        return None
    return m.group(1) or "1"


def _power_from(body: dict[str, Any]) -> dict[str, str]:
    power = {}
    for k, v in body.items():
        relay = _relay(k) if isinstance(k, str) else None
        if relay is not None:
            power[relay] = on_off(v, what=k)
    return power


def _numbers(body: dict[str, Any]) -> dict[str, float]:
    """Numeric readings of a SENSOR payload: ENERGY flattened, other sensors as "Name.Field"."""
    reading: dict[str, float] = {}
    energy = body.get("ENERGY")
    if isinstance(energy, dict):
        names = {
            "Total": "energy",
            "Power": "power",
            "Voltage": "voltage",
            "Current": "current",
            "Factor": "power_factor",
            "Today": "energy_today",
            "ApparentPower": "apparent_power",
            "ReactivePower": "reactive_power",
            "Frequency": "frequency",
        }
        for src, dst in names.items():
            value = energy.get(src)
            if isinstance(value, list):  # multi-channel meters report one value per channel
                nums = [v for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
                value = (
                    sum(nums)
                    if dst in ("power", "energy", "current") and nums
                    else (nums[0] if nums else None)
                )
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                reading[dst] = float(value)
    for name, value in body.items():
        if name in ("ENERGY", "Time") or not isinstance(value, dict):
            continue
        for field, v in value.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                reading[f"{name}.{field}"] = float(v)
    return reading


class Tasmota(DeviceProfile):
    name = "tasmota"
    subscriptions = ["stat/+/+", "tele/+/+", "+/stat/+", "+/tele/+"]
    connection_subscriptions = ["tele/+/LWT", "+/tele/LWT"]

    def match(self, levels: list[str]) -> tuple[str, str] | None:
        if len(levels) != 3:
            return None
        if levels[0] in PREFIXES:
            return levels[1], f"{levels[0]}/{levels[2]}/{PREFIX_FIRST}"
        if levels[1] in PREFIXES:
            return levels[0], f"{levels[1]}/{levels[2]}/{TOPIC_FIRST}"
        return None

    def parse(self, key: str, channel: str, payload: bytes) -> Parsed:
        prefix, command, order = channel.split("/")
        if not COMMAND_RE.match(command):
            raise Reject(FOREIGN_TOPIC, f"not a Tasmota topic: {prefix}/{command[:40]}")
        parsed = Parsed(key, f"{prefix}/{command}", topic_order=order, connection="online")
        relay = _relay(command)

        if prefix == "stat" and relay is not None:
            parsed.power = {relay: on_off(text(payload))}
            parsed.kind = "status"
            parsed.data = {command: parsed.power[relay]}
        elif prefix == "stat" and command == "RESULT":
            body = load_object(payload)
            parsed.kind, parsed.data = "status", body
            parsed.power = _power_from(body) or None
        elif prefix == "tele" and command == "LWT":
            value = text(payload).lower()
            if value not in ("online", "offline"):
                raise Reject(INVALID, f"LWT must be Online or Offline, got {value[:40]!r}")
            parsed.connection = value
        elif prefix == "tele" and command == "STATE":
            body = load_object(payload)
            parsed.kind, parsed.data = "status", body
            parsed.power = _power_from(body) or None
            wifi = body.get("Wifi")
            if isinstance(wifi, dict):
                parsed.rssi = optional_int(wifi.get("Signal", wifi.get("RSSI")))
            parsed.uptime = optional_text(body.get("Uptime"))
        elif prefix == "tele" and command == "SENSOR":
            body = load_object(payload)
            parsed.kind, parsed.data = "telemetry", body
            parsed.reading = _numbers(body) or None
        # Any other well-formed Tasmota topic (STATUS11, INFO1, UPGRADE…) is a sign of life only.
        return parsed

    def command_messages(
        self,
        device: Any,
        action: str,
        *,
        relay: int | None = None,
        request_id: str,
        name: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> list[tuple[str, bytes]]:
        index = relay or 1
        command = "POWER" if device.relay_count == 1 and index == 1 else f"POWER{index}"
        if device.topic_order == TOPIC_FIRST:
            topic = f"{device.topic}/cmnd/{command}"
        else:
            topic = f"cmnd/{device.topic}/{command}"
        return [(topic, action.encode())]
