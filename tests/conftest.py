"""The fixture world: owner alice (with teammate bob) and outsider charlie."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

from apps.devices.models import Device, Profile
from apps.owners.models import Membership, Owner, Role


@pytest.fixture
def alice_owner(db) -> Owner:
    return Owner.objects.create(name="Alice Lamps", slug="alice", timezone="Europe/Berlin")


@pytest.fixture
def charlie_owner(db) -> Owner:
    return Owner.objects.create(name="Charlie Meters", slug="charlie", timezone="Asia/Jakarta")


@pytest.fixture
def alice(django_user_model, alice_owner):
    user = django_user_model.objects.create_user("alice", "alice@example.com", "alice-pass-123")
    Membership.objects.create(owner=alice_owner, user=user, role=Role.OWNER)
    return user


@pytest.fixture
def bob(django_user_model, alice_owner):
    """Alice's teammate, a viewer: may look, may not switch or configure."""
    user = django_user_model.objects.create_user("bob", "bob@example.com", "bob-pass-123")
    Membership.objects.create(owner=alice_owner, user=user, role=Role.VIEWER)
    return user


@pytest.fixture
def charlie(django_user_model, charlie_owner):
    user = django_user_model.objects.create_user(
        "charlie", "charlie@example.com", "charlie-pass-123"
    )
    Membership.objects.create(owner=charlie_owner, user=user, role=Role.OWNER)
    return user


@pytest.fixture
def alice_lamp(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner, device_id="alice-lamp-1", name="Living room", profile=Profile.ESP32_LAMP
    )


@pytest.fixture
def alice_relay(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner,
        device_id="alice-relay-1",
        name="Garden relay",
        profile=Profile.TASMOTA,
        topic="tasmota_A1B2C3",
        relay_count=2,
        expected_interval=300,
    )


@pytest.fixture
def alice_meter(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner,
        device_id="alice-meter-1",
        name="Traction DC meter",
        profile=Profile.METER_V2,
        expected_interval=10,
    )


@pytest.fixture
def charlie_lamp(charlie_owner) -> Device:
    return Device.objects.create(
        owner=charlie_owner,
        device_id="charlie-lamp-1",
        name="Charlie's lamp",
        profile=Profile.ESP32_LAMP,
    )


# --- MQTT broker for tests ------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    url: str
    protocol: str  # "5" for Mosquitto, "3.1.1" for the embedded amqtt broker
    host: str
    port: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[Broker]:
    """The real Mosquitto when TEST_MOSQUITTO_URL is set (CI), else the embedded broker."""
    url = os.environ.get("TEST_MOSQUITTO_URL")
    if url:
        parsed = urlparse(url)
        yield Broker(url, "5", parsed.hostname or "127.0.0.1", parsed.port or 1883)
        return
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "embedded_broker", "--bind", f"127.0.0.1:{port}"],
        cwd=Path(__file__).resolve().parent.parent,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("embedded broker exited") from None
            time.sleep(0.1)
    try:
        yield Broker(f"mqtt://127.0.0.1:{port}", "3.1.1", "127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(10)


def mosquitto_binary(why: str) -> str:
    """The mosquitto binary (Debian package mosquitto); the test is skipped without it."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not binary:
        pytest.skip(f"needs the mosquitto binary ({why})")
    return binary


def launch_mosquitto(binary: str, directory: Path, config: str, port: int) -> subprocess.Popen:
    """Start Mosquitto with `config` (written to `directory`) and wait until it listens on
    `port`; raises with its error output if it does not within 10 s."""
    conf = directory / "mosquitto.conf"
    conf.write_text(config)
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.stderr.read() if proc.stderr else b""
                raise RuntimeError(f"mosquitto did not start: {err!r} ({conf})") from None
            time.sleep(0.05)


@pytest.fixture
def private_mosquitto(tmp_path) -> Iterator[Broker]:
    """A Mosquitto of this test's own, configured to queue without limit for offline sessions.

    The system Mosquitto keeps only 1,000 queued messages per offline client (its default), and
    is shared with whatever else runs on the machine; crash tests need neither.
    """
    binary = mosquitto_binary("the embedded broker keeps no session across a crash")
    port = free_port()
    proc = launch_mosquitto(
        binary,
        tmp_path,
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_inflight_messages 0\n",
        port,
    )
    try:
        yield Broker(f"mqtt://127.0.0.1:{port}", "5", "127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(10)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a platform process (listener, daphne, worker) on the test database.

    Call it inside a test that uses `transactional_db`, so rows the test creates are committed
    and visible to the subprocess.
    """
    from django.db import connection

    env = dict(os.environ)
    cfg = connection.settings_dict
    if cfg["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{cfg['NAME']}"
        env.setdefault("EMBEDDED", "true")
    else:
        user = cfg.get("USER") or ""
        auth = f"{user}:{cfg.get('PASSWORD')}@" if cfg.get("PASSWORD") else f"{user}@"
        host, port = cfg.get("HOST") or "127.0.0.1", cfg.get("PORT") or 5432
        env["DATABASE_URL"] = f"postgres://{auth}{host}:{port}/{cfg['NAME']}"
    env.update(extra)
    return env
