"""What every device profile provides, and the lenient parsing helpers they share.

A profile knows its topics and payloads (SPEC §4) and nothing else: it turns one MQTT message into
a `Parsed` (or raises `Reject` with a quarantine reason) and builds the messages of a command.
The listener and the command publisher only talk to profiles through this interface.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import orjson

# Mirrors apps.devices.models.QuarantineReason; kept as plain strings so parsing has no ORM import.
UNKNOWN_DEVICE = "unknown_device"
MALFORMED = "malformed"
OVERSIZE = "oversize"
FOREIGN_TOPIC = "foreign_topic"
INVALID = "invalid"
BAD_ID = "bad_id"

DEVICE_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
MAX_TEXT = 64  # longest free-text state value we keep (firmware, ip, uptime, request ids)


class Reject(Exception):
    """The message is refused; it goes to the quarantine with this reason and detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:255]


@dataclass(slots=True)
class Parsed:
    """One accepted message, normalized. Only the fields a message carries are set."""

    key: str  # the device's topic key: its id, or a Tasmota device's topic
    channel: str  # which of the profile's topics it came on, e.g. "status", "lwt", "SENSOR"
    kind: str | None = None  # EventKind of the telemetry row to store; None: store nothing
    data: dict[str, Any] = field(default_factory=dict)
    ts: datetime | None = None  # device time, when the device sent a plausible one
    connection: str | None = None  # "online" / "offline"
    power: dict[str, str] | None = None  # relay ("1".."8") -> "ON"/"OFF"
    reading: dict[str, float] | None = None  # normalized last reading for tiles and charts
    seq: int | None = None
    boot_id: str | None = None
    new_boot: bool = False  # a hello: the sequence may restart
    firmware: str | None = None
    device_type: str | None = None
    ip: str | None = None
    rssi: int | None = None
    uptime: str | None = None
    request_id: str | None = None
    topic_order: str | None = None  # Tasmota: the FullTopic order this message used
    # What consumers of the event see as its `data` (delivery templates, column mappings) when
    # it differs from the stored raw payload, e.g. a meter's readings without the envelope.
    event_data: dict[str, Any] | None = None


class DeviceProfile:
    name: ClassVar[str]
    #: topic filters the listener subscribes to
    subscriptions: ClassVar[list[str]]
    #: the subset that carries retained connection state (LWT/status); see mqtt_listen
    connection_subscriptions: ClassVar[list[str]]

    def match(self, levels: list[str]) -> tuple[str, str] | None:
        """(device key, channel) when the topic belongs to this profile, else None."""
        raise NotImplementedError

    def parse(self, key: str, channel: str, payload: bytes) -> Parsed:
        raise NotImplementedError

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
        """The (topic, payload) pairs that carry one command to `device`."""
        raise NotImplementedError


# --- lenient parsing helpers ------------------------------------------------------------------


def check_key(key: str) -> str:
    if not DEVICE_KEY_RE.match(key):
        raise Reject(BAD_ID, f"not a valid device id or topic: {key[:80]!r}")
    return key


def load_json(payload: bytes) -> Any:
    try:
        # orjson refuses NaN/Infinity, invalid UTF-8 and trailing garbage: all malformed here.
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Reject(MALFORMED, f"not JSON: {exc}") from None


def load_object(payload: bytes) -> dict[str, Any]:
    value = load_json(payload)
    if not isinstance(value, dict):
        raise Reject(INVALID, f"expected a JSON object, got {type(value).__name__}")
    return value


def text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Reject(MALFORMED, "payload is not UTF-8 text") from None


def on_off(value: Any, *, what: str = "power") -> str:
    """ON/OFF from the forms devices really send: "ON", "on", 1, true."""
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    if isinstance(value, int) and value in (0, 1):
        return "ON" if value else "OFF"
    if isinstance(value, str) and value.strip().upper() in ("ON", "OFF", "1", "0"):
        v = value.strip().upper()
        return "ON" if v in ("ON", "1") else "OFF"
    raise Reject(INVALID, f"{what} must be ON or OFF, got {str(value)[:40]!r}")


def optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)[:MAX_TEXT]
    return None


def optional_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value))
        except ValueError:
            return None
    return None


def number(value: Any, *, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Reject(INVALID, f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise Reject(INVALID, f"{what} must be finite")
    return float(value)


_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


def device_time(value: Any) -> datetime | None:
    """A device timestamp (ISO 8601, epoch seconds or epoch ms) if plausible, else None.

    Devices without NTP send 1970 times; clocks drift. An implausible time is not an error:
    the message is kept and stamped with the reception time instead.
    """
    ts: datetime | None = None
    if type(value) is str:  # the usual form first
        if len(value) > 40:
            return None
        try:
            ts = datetime.fromisoformat(value)  # Python 3.11: "Z" included
        except ValueError:
            return None
        if ts.tzinfo is None:
            return None  # local time of an unknown zone (Tasmota's "Time"): not usable
    elif isinstance(value, bool) or value is None:
        return None
    elif isinstance(value, int | float) and math.isfinite(value):
        seconds = value / 1000 if value > 1e11 else value
        try:
            ts = datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if ts is None or ts < _EARLIEST or ts > _latest():
        return None
    return ts


_latest_at = [0.0, _EARLIEST]


def _latest() -> datetime:
    """A day from now: later device times are implausible. Recomputed once a second (every
    message of a busy listener asks)."""
    now = time.monotonic()
    if now - _latest_at[0] >= 1.0:
        _latest_at[0], _latest_at[1] = now, datetime.now(UTC) + timedelta(days=1)
    return _latest_at[1]
