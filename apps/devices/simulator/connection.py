"""MQTT plumbing for the simulator: broker URLs, paho clients, and one thread driving them all.

Thousands of simulated devices each hold their own MQTT connection (so each has its own will).
paho's `loop_start()` would mean one thread per device; instead a single `Reactor` drives every
client through paho's external-loop API (`on_socket_open`/`close`/`register_write` +
`loop_read`/`loop_write`/`loop_misc`) over one `selectors` poll. Everything — devices, timers,
paho callbacks — then runs on that one thread, so nothing in the simulator needs a lock.
"""

from __future__ import annotations

import contextlib
import selectors
import ssl
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from apps.devices.mqtt import mqtt_params

from .base import Message


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    tls: bool = False
    username: str = ""
    password: str = ""

    @classmethod
    def parse(cls, url: str) -> Broker:
        """`mqtt://[user:pass@]host[:port]` or `mqtts://…` (TLS, port 8883 by default),
        read exactly as the listener and the command publisher read MQTT_URL."""
        params = mqtt_params(url)
        return cls(
            host=params["host"],
            port=params["port"],
            tls=params["tls"],
            username=params["username"] or "",
            password=params["password"] or "",
        )

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def make_client(
    client_id: str,
    broker: Broker,
    *,
    will: Message | None = None,
    username: str = "",
    password: str = "",
    protocol: int = mqtt.MQTTv311,
    ca_file: str | None = None,
    max_inflight: int = 100,
    userdata: Any = None,
) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, userdata=userdata
    )
    # A device's own login wins over the one in the URL.
    user, pwd = (username, password) if username else (broker.username, broker.password)
    if user:
        client.username_pw_set(user, pwd or None)
    if broker.tls:
        client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    client.max_inflight_messages_set(max_inflight)
    client.connect_timeout = 3.0
    return client


class Reactor:
    """One selector over the sockets of many paho clients (paho's external event loop)."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._written

    def _opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _written(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(sock, selectors.EVENT_READ, client)

    def forget(self, sock: Any) -> None:
        self._closed(None, None, sock)  # type: ignore[arg-type]

    def poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(max(0.0, timeout)):
            client: mqtt.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
                sock = client.socket()
                # TLS can hold decrypted bytes that select() cannot see: drain them now.
                while isinstance(sock, ssl.SSLSocket) and sock.pending():
                    client.loop_read()
                    sock = client.socket()
            if mask & selectors.EVENT_WRITE and client.want_write():
                client.loop_write()

    def close(self) -> None:
        self.selector.close()
