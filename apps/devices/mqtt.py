"""Broker connection settings shared by the listener, the command publisher and the simulator."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from django.conf import settings


def mqtt_params(url: str) -> dict:
    """host, port, username, password and tls of an mqtt:// or mqtts:// URL."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"MQTT_URL must be mqtt:// or mqtts://, got {parsed.scheme}://…")
    return {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or (8883 if parsed.scheme in ("mqtts", "ssl") else 1883),
        "username": unquote(parsed.username) if parsed.username else None,
        "password": unquote(parsed.password) if parsed.password else None,
        "tls": parsed.scheme in ("mqtts", "ssl"),
    }


def mqtt_protocol() -> int:
    return mqtt.MQTTv5 if str(settings.MQTT_PROTOCOL) == "5" else mqtt.MQTTv311
