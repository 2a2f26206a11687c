"""The platform's outgoing MQTT connection: commands to devices.

One paho-mqtt client per process, made on first use and shared by every thread (web requests,
Celery tasks, the schedule runner). Every message goes out QoS 1, never retained, and `publish`
returns only when the broker has acknowledged it (PUBACK) or raises `PublishError`.

Why the client is thrown away after a timeout: paho keeps unacknowledged QoS 1 messages and
sends them again after a reconnect. A command we have already reported as failed must not reach
the lamp minutes later, so a connection that timed out is closed with everything it still held,
and the next publish opens a fresh one. For the same reason nothing is handed to paho while it
is disconnected (it would queue it). On MQTT 5 each message also carries a message-expiry
interval, so a broker never delivers a stale command to a device with a persistent session.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from django.conf import settings
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .mqtt import apply_login, mqtt_params

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
# Messages on the wire before paho waits for PUBACKs; high enough to pipeline a schedule burst.
MAX_INFLIGHT = 500


class PublishError(Exception):
    """The broker did not accept the message (unreachable, refused, or no PUBACK in time)."""


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    expiry: int | None = None  # seconds; MQTT 5 message-expiry interval


class Publisher:
    """A lazily connected, self-reconnecting QoS 1 publisher. Thread-safe."""

    def __init__(
        self, url: str | None = None, *, protocol: str | None = None, client_id: str | None = None
    ) -> None:
        self.url = url or settings.MQTT_URL
        self.protocol = str(protocol or getattr(settings, "MQTT_PROTOCOL", "3.1.1"))
        prefix = getattr(settings, "MQTT_CLIENT_ID_PREFIX", "iotplatform")
        self.client_id = (
            client_id
            or (f"{prefix}-pub-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")[:64]
        )
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._refused: str = ""

    # --- public ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        error = self.publish_many([Message(topic, payload)], timeout=timeout)[0]
        if error is not None:
            raise error

    def publish_many(
        self, messages: Sequence[Message], *, timeout: float = DEFAULT_TIMEOUT
    ) -> list[PublishError | None]:
        """Publish all messages pipelined, then wait for their PUBACKs (one shared deadline).

        Returns one entry per message: None when the broker acknowledged it, else the error.
        """
        if not messages:
            return []
        deadline = time.monotonic() + timeout
        try:
            client = self._ready_client(deadline)
        except PublishError as exc:
            return [exc] * len(messages)

        infos: list[mqtt.MQTTMessageInfo | PublishError] = []
        for m in messages:
            if not client.is_connected():
                infos.append(PublishError("connection to the broker lost"))
                continue
            info = client.publish(
                m.topic, m.payload, qos=1, retain=False, properties=self._properties(m)
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                infos.append(PublishError(f"publish refused: {mqtt.error_string(info.rc)}"))
            else:
                infos.append(info)

        results: list[PublishError | None] = []
        timed_out = False
        for info in infos:
            if isinstance(info, PublishError):
                results.append(info)
                continue
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                results.append(PublishError(str(exc)))
                continue
            if info.is_published():
                results.append(None)
            else:
                timed_out = True
                results.append(PublishError(f"no PUBACK from the broker within {timeout:g}s"))
        if timed_out:
            self._discard(client, "PUBACK timeout")
        return results

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._discard_locked(self._client, "closed")

    # --- connection -----------------------------------------------------------------------

    def _properties(self, m: Message) -> Properties | None:
        if self.protocol != "5" or not m.expiry:
            return None
        return _expiry_properties(max(1, int(m.expiry)))

    def _ready_client(self, deadline: float) -> mqtt.Client:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            client = self._client
        # Wait for the first CONNACK, or for paho's automatic reconnect after a drop.
        if not self._connected.wait(max(0.0, deadline - time.monotonic())):
            reason = self._refused or "broker not reachable"
            raise PublishError(f"not connected to {self._safe_url()}: {reason}")
        return client

    def _connect(self) -> mqtt.Client:
        params = mqtt_params(self.url)
        v5 = self.protocol == "5"
        kwargs = {} if v5 else {"clean_session": True}
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            **kwargs,
        )
        apply_login(client, params)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._connected.clear()
        self._refused = ""
        client.connect_async(params["host"], params["port"], keepalive=30)
        client.loop_start()
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.warning("command publisher: broker refused the connection: %s", reason_code)
            return
        self._refused = ""
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code.is_failure:
            log.warning("command publisher disconnected: %s", reason_code)

    def _discard(self, client: mqtt.Client, why: str) -> None:
        with self._lock:
            if self._client is client:
                self._discard_locked(client, why)

    def _discard_locked(self, client: mqtt.Client, why: str) -> None:
        log.warning("command publisher: dropping the connection (%s)", why)
        self._client = None
        self._connected.clear()
        try:
            client.disconnect()
        finally:
            client.loop_stop()

    def _safe_url(self) -> str:
        p = mqtt_params(self.url)
        return f"{p['host']}:{p['port']}"


@functools.lru_cache(maxsize=64)
def _expiry_properties(seconds: int) -> Properties:
    """Shared, never mutated: a burst of commands does not build one Properties per message."""
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = seconds
    return props


_publisher: Publisher | None = None
_publisher_pid: int | None = None
_publisher_lock = threading.Lock()


def get_publisher() -> Publisher:
    """The process-wide publisher. A forked child (Celery prefork) gets its own connection."""
    global _publisher, _publisher_pid
    with _publisher_lock:
        if _publisher is None or _publisher_pid != os.getpid():
            _publisher = Publisher()
            _publisher_pid = os.getpid()
        return _publisher


def reset_publisher() -> None:
    """Close the process-wide publisher (tests, settings changes)."""
    global _publisher
    with _publisher_lock:
        if _publisher is not None and _publisher_pid == os.getpid():
            _publisher.close()
        _publisher = None
