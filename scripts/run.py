#!/usr/bin/env python3
"""`make run`: prepare the database and the demo, then start every process under one supervisor.

Steps: check the ports, migrate (both databases in the embedded mode), collect static files, seed
the demo owner, print the URL and the login, then replace this process with honcho running
Procfile.embedded. Ctrl-C reaches honcho, which stops every process (SIGTERM, then SIGKILL after
5 s). Every step is idempotent, so a second `make run` picks up where the first left off.

Launcher switches (environment or .env; see docs/configuration.md):
  PORT=8000              web port
  EMBEDDED_BROKER=auto   start the embedded MQTT broker; auto = when MQTT_URL points at loopback
  SIMULATE=true          start the device simulator for the demo owner
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from apps.core.netcheck import mqtt_connack, tcp_open  # noqa: E402


def fail(message: str) -> None:
    print(f"\nmake run: {message}\n", file=sys.stderr)
    sys.exit(1)


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "iotplatform.settings")
    import django

    django.setup()  # also loads .env into os.environ, so the switches below see it
    import environ
    from django.conf import settings
    from django.core.management import call_command

    env = environ.Env()
    port = env.int("PORT", default=8000)
    mqtt = urlparse(settings.MQTT_URL)
    mqtt_host, mqtt_port = mqtt.hostname or "127.0.0.1", mqtt.port or 1883
    auto_broker = is_loopback(mqtt_host) and mqtt.scheme == "mqtt"
    embedded_broker = env.str("EMBEDDED_BROKER", default="auto")
    embedded_broker = auto_broker if embedded_broker == "auto" else env.bool("EMBEDDED_BROKER")
    simulate = env.bool("SIMULATE", default=True)

    if not port_is_free("127.0.0.1", port):
        fail(f"port {port} is in use. Stop what runs there, or pick another: PORT=8001 make run")
    if embedded_broker and tcp_open(mqtt_host, mqtt_port):
        fail(
            f"something already listens on {mqtt_host}:{mqtt_port}, where the embedded MQTT "
            "broker should run (a previous `make run` still alive?). Stop it, or set "
            "EMBEDDED_BROKER=false to use that broker instead."
        )
    if not embedded_broker and not mqtt_connack(settings.MQTT_URL):
        print(f"warning: no MQTT broker answers at {mqtt_host}:{mqtt_port} yet", file=sys.stderr)

    step("Migrating the database")
    call_command("migrate", interactive=False, verbosity=0)
    if "channels" in settings.DATABASES:  # the SQLite channel layer keeps its own file
        call_command("migrate", database="channels", interactive=False, verbosity=0)
    step("Collecting static files")
    call_command("collectstatic", interactive=False, verbosity=0)
    step("Seeding the demo owner")
    call_command("seed_demo")

    processes = ["web", "listener", "worker", "beat"]
    if embedded_broker:
        processes.insert(1, "broker")
    if simulate:
        processes.append("simulator")

    broker = "embedded broker" if embedded_broker else "external broker"
    lines = [
        f"Open       http://127.0.0.1:{port}/",
        f"Log in     demo / {settings.DEMO_PASSWORD}",
        f"Admin      http://127.0.0.1:{port}/admin/",
        f"MQTT       {mqtt_host}:{mqtt_port} ({broker})",
        f"Database   {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}",
        f"Processes  {', '.join(processes)}",
        "Stop       Ctrl-C",
    ]
    width = max(map(len, lines))
    print("\n  iotplatform\n  " + "-" * width)
    print("\n".join(f"  {line}" for line in lines) + "\n", flush=True)

    # Every process must agree on the broker, use this virtualenv, and log line by line.
    os.environ["MQTT_URL"] = settings.MQTT_URL
    # amqtt speaks MQTT 3.1.1 only; settings would pick 5 for an explicitly set MQTT_URL.
    os.environ["MQTT_PROTOCOL"] = "3.1.1" if embedded_broker else settings.MQTT_PROTOCOL
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["PYTHONUNBUFFERED"] = "1"
    honcho = str(Path(sys.executable).parent / "honcho")
    procfile = os.environ.get("PROCFILE", "Procfile.embedded")
    # exec, not a child: Ctrl-C and SIGTERM must reach honcho itself.
    os.execv(honcho, [honcho, "start", "-f", procfile, "--port", str(port), *processes])  # noqa: S606


if __name__ == "__main__":
    main()
