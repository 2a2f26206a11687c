"""`meter-v2`: DC and AC traction power meters with a versioned JSON envelope. SPEC §4.3."""

from __future__ import annotations

import math
from typing import Any

import orjson

from .base import (
    INVALID,
    DeviceProfile,
    Parsed,
    Reject,
    device_time,
    load_json,
    load_object,
    optional_text,
)

CHANNELS = {
    ("telemetry",): "telemetry",
    ("hello",): "hello",
    ("status",): "status",
    ("command", "ack"): "command_ack",
    ("ota", "status"): "ota_status",
}
DEVICE_TYPES = {"power_meter_dc", "power_meter_ac"}
OTA_STATES = {"downloading", "applying", "done", "failed"}
ENVELOPE = {"v", "seq", "msg_type", "ts"}


def _reading(data: dict[str, Any]) -> dict[str, float]:
    """Numeric readings; one level of nesting (per-phase values) flattened as "L1.voltage"."""
    reading: dict[str, float] = {}
    for name, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                if v is None:
                    continue
                reading[f"{name}.{sub}"] = _finite(v, f"data.{name}.{sub}")
        else:
            reading[name] = _finite(value, f"data.{name}")
    return reading


def _finite(value: Any, what: str) -> float:
    if type(value) is float and value - value == 0.0:  # the usual case; NaN and ±inf fail it
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Reject(INVALID, f"{what[:80]} must be a finite number")
    return float(value)


class MeterV2(DeviceProfile):
    name = "meter-v2"
    subscriptions = [
        "iot/+/telemetry",
        "iot/+/hello",
        "iot/+/status",
        "iot/+/command/ack",
        "iot/+/ota/status",
    ]
    connection_subscriptions = ["iot/+/status"]

    def match(self, levels: list[str]) -> tuple[str, str] | None:
        if len(levels) < 3 or levels[0] != "iot":
            return None
        channel = CHANNELS.get(tuple(levels[2:]))
        return (levels[1], channel) if channel else None

    def parse(self, key: str, channel: str, payload: bytes) -> Parsed:
        if channel == "status":
            return self._status(key, payload)

        body = load_object(payload)
        if body.get("v") != 2:
            raise Reject(INVALID, "not a v2 envelope (v must be 2)")
        msg_type = body.get("msg_type", channel)
        if msg_type != channel:
            raise Reject(INVALID, f"msg_type {str(msg_type)[:32]!r} does not match the topic")
        seq = body.get("seq")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
            raise Reject(INVALID, "seq must be a non-negative integer")
        boot_id = body.get("boot_id")
        if boot_id is not None and not (isinstance(boot_id, str) and 0 < len(boot_id) <= 64):
            raise Reject(INVALID, "boot_id must be a string of 1 to 64 characters")
        parsed = Parsed(
            key,
            channel,
            kind=channel,
            data=body,
            ts=device_time(body.get("ts")),
            connection="online",
            seq=seq,
            boot_id=boot_id,
        )
        # Events carry the message without its envelope (seq and ts travel beside it), and a
        # reading's values at the top: `${data.voltage}` in a template, like every profile.
        parsed.event_data = {k: v for k, v in body.items() if k not in ENVELOPE}

        if channel == "telemetry":
            data = body.get("data")
            if not isinstance(data, dict):
                raise Reject(INVALID, "telemetry without a data object")
            device_type = body.get("device_type")
            if device_type is not None and device_type not in DEVICE_TYPES:
                raise Reject(INVALID, f"unknown device_type {str(device_type)[:32]!r}")
            parsed.reading = _reading(data)
            parsed.device_type = device_type
            parsed.event_data = {**parsed.event_data, **data}
            del parsed.event_data["data"]
        elif channel == "hello":
            if boot_id is None:
                raise Reject(INVALID, "hello without boot_id")
            parsed.new_boot = True
            parsed.firmware = optional_text(body.get("fw_version"))
            parsed.device_type = optional_text(body.get("device_type"))
        elif channel == "command_ack":
            command_id = body.get("command_id")
            if not (isinstance(command_id, str) and 0 < len(command_id) <= 64):
                raise Reject(INVALID, "command_ack without a command_id")
            if body.get("status") not in ("ok", "error"):
                raise Reject(INVALID, "command_ack status must be ok or error")
            parsed.request_id = command_id
        elif channel == "ota_status":
            if body.get("state") not in OTA_STATES:
                raise Reject(INVALID, f"ota state must be one of {sorted(OTA_STATES)}")
            if body.get("state") == "done" and body.get("version"):
                parsed.firmware = optional_text(body.get("version"))
        return parsed

    def _status(self, key: str, payload: bytes) -> Parsed:
        stripped = payload.strip()
        if stripped.lower() in (b"online", b"offline"):
            return Parsed(key, "status", connection=stripped.decode().lower())
        value = load_json(payload)
        status = value.get("status") if isinstance(value, dict) else value
        if status not in ("online", "offline"):
            raise Reject(INVALID, "status must be online or offline")
        return Parsed(key, "status", connection=status)

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
        body = {
            "v": 2,
            "command_id": request_id,
            "name": name or action.lower(),
            "params": params or {},
        }
        return [(f"iot/{device.topic}/command", orjson.dumps(body))]
