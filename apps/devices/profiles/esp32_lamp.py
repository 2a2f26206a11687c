"""`esp32-lamp`: our own ESP32 firmware (firmware/esp32-smartlamp). SPEC §4.1."""

from __future__ import annotations

from typing import Any

import orjson

from .base import (
    INVALID,
    DeviceProfile,
    Parsed,
    Reject,
    device_time,
    load_object,
    on_off,
    optional_int,
    optional_text,
    text,
)


class Esp32Lamp(DeviceProfile):
    name = "esp32-lamp"
    subscriptions = ["home/+/status", "home/+/lwt"]
    connection_subscriptions = ["home/+/lwt"]

    def match(self, levels: list[str]) -> tuple[str, str] | None:
        if len(levels) == 3 and levels[0] == "home" and levels[2] in ("status", "lwt"):
            return levels[1], levels[2]
        return None

    def parse(self, key: str, channel: str, payload: bytes) -> Parsed:
        if channel == "lwt":
            value = text(payload).upper()
            if value not in ("ONLINE", "OFFLINE"):
                raise Reject(INVALID, f"LWT must be ONLINE or OFFLINE, got {value[:40]!r}")
            return Parsed(key, channel, connection=value.lower())

        body = load_object(payload)
        reported = body.get("deviceId")
        if reported is not None and reported != key:
            raise Reject(INVALID, f"deviceId {str(reported)[:64]!r} does not match the topic")
        if "power" not in body:
            raise Reject(INVALID, "status without power")
        power = on_off(body["power"])
        request_id = body.get("requestId")
        if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= 64):
            raise Reject(INVALID, "requestId must be a string of at most 64 characters")
        return Parsed(
            key,
            channel,
            kind="status",
            data=body,
            ts=device_time(body.get("ts")),
            connection="online",
            power={"1": power},
            request_id=request_id,
            firmware=optional_text(body.get("fw")),
            ip=optional_text(body.get("ip")),
            rssi=optional_int(body.get("rssi")),
            uptime=optional_text(body.get("uptime")),
        )

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
        body = {"deviceId": device.device_id, "action": action, "requestId": request_id}
        return [(f"home/{device.topic}/cmd", orjson.dumps(body))]
