"""Device profiles: one module per profile, one registry, one routing function.

route(topic) -> (profile, key, channel)   # or Reject
PROFILES[name].parse(key, channel, payload) -> Parsed   # or Reject
PROFILES[name].command_messages(device, action, relay=…, request_id=…) -> [(topic, payload)]
"""

from __future__ import annotations

from .base import BAD_ID, FOREIGN_TOPIC, DeviceProfile, Parsed, Reject, check_key
from .esp32_lamp import Esp32Lamp
from .meter_v2 import MeterV2
from .tasmota import Tasmota

PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (Esp32Lamp(), Tasmota(), MeterV2())}

__all__ = ["PROFILES", "DeviceProfile", "Parsed", "Reject", "route", "subscriptions"]


# Topics routed before: a fleet sends the same few topics per device again and again, and
# routing is a pure function of the topic (split, match each profile, check the key).
_routed: dict[str, tuple[DeviceProfile, str, str]] = {}
ROUTED_KEPT = 100_000


def route(topic: str) -> tuple[DeviceProfile, str, str]:
    """The profile a topic belongs to, with the device key and channel in it."""
    found = _routed.get(topic)
    if found is None:
        found = _route(topic)  # a refused topic raises: never kept
        if len(_routed) >= ROUTED_KEPT:
            _routed.clear()
        _routed[topic] = found
    return found


def _route(topic: str) -> tuple[DeviceProfile, str, str]:
    if len(topic) > 255 or "\x00" in topic:
        raise Reject(FOREIGN_TOPIC, "topic too long or contains NUL")
    levels = topic.split("/")
    for profile in PROFILES.values():
        found = profile.match(levels)
        if found:
            key, channel = found
            if not key:
                raise Reject(BAD_ID, "empty device id in topic")
            return profile, check_key(key), channel
    raise Reject(FOREIGN_TOPIC, "topic is not part of any device profile")


def subscriptions() -> tuple[list[str], list[str]]:
    """(all topic filters, the filters that carry retained connection state)."""
    filters: list[str] = []
    connection: list[str] = []
    for profile in PROFILES.values():
        filters += profile.subscriptions
        connection += profile.connection_subscriptions
    return filters, connection
