"""Run the embedded MQTT broker (amqtt) for the embedded mode of `make run`.

amqtt is the only broker installable with pip that works (see FACTS.md): MQTT 3.1.1, QoS 0/1,
wildcards, retained messages and wills, but no shared subscriptions and no persistence here —
retained messages live in memory and are lost when this process stops. Production uses Mosquitto
(`MQTT_URL`) and does not run this command.

amqtt's own CLI keeps running after a failed bind, which would leave `make run` with a "broker"
that nobody can reach. This command awaits the start itself, then checks that its socket really
accepts connections, and exits non-zero otherwise so the supervisor stops everything.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from urllib.parse import urlparse

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.core.netcheck import mqtt_connack

log = logging.getLogger("iotplatform.embedded_broker")

DEFAULT_PORT = 1884


def parse_bind(value: str) -> tuple[str, int]:
    """`host:port` (or an `mqtt://` URL) -> (host, port)."""
    if "://" in value:
        url = urlparse(value)
        if url.scheme not in ("mqtt", "tcp"):
            raise CommandError(
                f"The embedded broker speaks plain MQTT only; {url.scheme}:// is not supported"
            )
        return url.hostname or "127.0.0.1", url.port or DEFAULT_PORT
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise CommandError(f"--bind must be host:port, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def broker_config(host: str, port: int) -> dict:
    bind_host = f"[{host}]" if ":" in host else host
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{bind_host}:{port}"}},
        # Anonymous access: the embedded broker listens on loopback for a local demo. Per-device
        # credentials and ACLs are a Mosquitto (production) feature.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def serve(host: str, port: int, stop: asyncio.Event) -> None:
    """Start the broker, prove it listens, then run until `stop` is set."""
    # Imported here: amqtt pulls in a state-machine library that logs noisily at import time.
    from amqtt.broker import Broker
    from amqtt.errors import BrokerError

    broker = Broker(broker_config(host, port), loop=asyncio.get_running_loop())
    try:
        await broker.start()
    except BrokerError as exc:
        raise CommandError(f"Embedded MQTT broker could not start on {host}:{port}: {exc}") from exc
    try:
        # A real MQTT handshake, run in a thread because it talks to this very event loop.
        probe_host = f"[{host}]" if ":" in host else host
        if not await asyncio.to_thread(mqtt_connack, f"mqtt://{probe_host}:{port}"):
            raise CommandError(f"Embedded MQTT broker started but {host}:{port} does not answer")
        log.info("embedded MQTT broker listening on %s:%s", host, port)
        await stop.wait()
        log.info("embedded MQTT broker stopping")
    finally:
        await broker.shutdown()


class Command(BaseCommand):
    help = "Run the embedded MQTT broker (amqtt) on the host and port of MQTT_URL."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--bind",
            help="host:port to listen on (default: the host and port of MQTT_URL, port 1884)",
        )

    def handle(self, *args, bind: str | None = None, **options) -> None:
        host, port = parse_bind(bind or settings.MQTT_URL)
        asyncio.run(self._main(host, port))

    async def _main(self, host: str, port: int) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(host, port, stop)
