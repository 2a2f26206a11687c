"""Brokers for the simulator tests: the embedded one (amqtt, in a thread) and Mosquitto.

The embedded broker runs in this process with the configuration `manage.py embedded_broker`
uses, so a test can stop and restart it on the same port in well under a second.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from apps.core.management.commands.embedded_broker import broker_config
from tests.services import require_mosquitto


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SimBroker:
    kind: str  # "embedded" or "mosquitto"
    host: str
    port: int
    protocol: int  # what the simulator speaks to it: amqtt has no MQTT 5
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _broker: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @classmethod
    def embedded(cls, port: int | None = None) -> SimBroker:
        broker = cls("embedded", "127.0.0.1", port or free_port(), mqtt.MQTTv311)
        broker.start()
        return broker

    @classmethod
    def mosquitto(cls) -> SimBroker:
        url = urlparse(require_mosquitto())
        return cls("mosquitto", url.hostname or "127.0.0.1", url.port or 1883, mqtt.MQTTv5)

    def start(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(broker_config(self.host, self.port), loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name=f"amqtt-{self.port}", daemon=True)
        self._thread.start()
        if not started.wait(20) or failure:
            raise RuntimeError(f"embedded broker did not start on {self.port}: {failure}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"embedded broker is not listening on {self.port}")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(20)
        loop.close()
        self._loop = self._thread = self._broker = None
