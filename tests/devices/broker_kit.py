"""A private Mosquitto with the dynamic-security plugin, and MQTT peers to probe its ACLs.

Mosquitto drops a PUBLISH the ACLs deny without telling the sender (QoS 1 still gets its
PUBACK), so ACL tests watch with a spy that may read everything, and use a barrier: the same
client publishes an allowed marker after the denied message; once the marker has arrived, the
denied message would have arrived before it (MQTT keeps one client's messages in order).
"""

from __future__ import annotations

import base64
import getpass
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from apps.devices.broker import DynsecAdmin
from tests.conftest import launch_mosquitto, mosquitto_binary

ADMIN = "dynsec-admin"
SPY = "platform-spy"
PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    *sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")),
)


@dataclass
class DynsecBroker:
    host: str
    port: int
    admin_password: str
    spy_password: str
    log: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def admin(self) -> DynsecAdmin:
        return DynsecAdmin(self.host, self.port, ADMIN, self.admin_password, timeout=5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_dynsec(path: Path, password: str) -> None:
    """The plugin's file with its admin client, as `mosquitto_ctrl dynsec init` writes it."""
    ctrl = shutil.which("mosquitto_ctrl")
    if ctrl:
        subprocess.run(
            [ctrl, "dynsec", "init", str(path), ADMIN, password],
            check=True,
            capture_output=True,
        )
        return
    # Same format without the tool: PBKDF2-SHA512 over the password with a 12-byte salt.
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    everything = [
        {"acltype": t, "topic": topic, "allow": True}
        for t, topic in [
            ("publishClientSend", "$CONTROL/dynamic-security/#"),
            ("publishClientReceive", "$CONTROL/dynamic-security/#"),
            ("subscribePattern", "$CONTROL/dynamic-security/#"),
            ("publishClientReceive", "$SYS/#"),
            ("subscribePattern", "$SYS/#"),
        ]
    ]
    data = {
        "clients": [
            {
                "username": ADMIN,
                "password": base64.b64encode(digest).decode(),
                "salt": base64.b64encode(salt).decode(),
                "iterations": 101,
                "roles": [{"rolename": "admin"}],
            }
        ],
        "roles": [{"rolename": "admin", "acls": everything}],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
    }
    path.write_text(json.dumps(data))


def start_dynsec_mosquitto(directory: Path) -> DynsecBroker:
    binary = mosquitto_binary("for dynamic security")
    plugin = next((p for p in PLUGIN_PATHS if os.path.exists(p)), None)
    if not plugin:
        pytest.skip("needs Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so)")
    admin_password = secrets.token_hex(16)
    dynsec = directory / "dynamic-security.json"
    _init_dynsec(dynsec, admin_password)
    port = _free_port()
    log = directory / "mosquitto.log"
    proc = launch_mosquitto(
        binary,
        directory,
        "per_listener_settings false\nallow_anonymous false\n"
        f"listener {port} 127.0.0.1\n"
        f"plugin {plugin}\nplugin_opt_config_file {dynsec}\n"
        "persistence false\n"
        # Run as root, Mosquitto would switch to the user "mosquitto", who cannot read tmp_path.
        f"user {getpass.getuser()}\n"
        # Everything Mosquitto logs, so a test can check that no password ends up there.
        f"log_dest file {log}\nlog_type all\n",
        port,
    )
    broker = DynsecBroker("127.0.0.1", port, admin_password, secrets.token_hex(16), log, proc)
    try:
        _add_platform_client(broker)
    except BaseException:
        stop(broker)
        raise
    return broker


def _add_platform_client(broker: DynsecBroker) -> None:
    """The platform's client, as docker/mosquitto/entrypoint.sh makes it: reads and writes all."""
    with broker.admin() as admin:
        answers = admin.run(
            [
                {
                    "command": "createRole",
                    "rolename": "platform",
                    "acls": [
                        {"acltype": "subscribePattern", "topic": "#", "allow": True},
                        {"acltype": "publishClientSend", "topic": "#", "allow": True},
                        {"acltype": "publishClientReceive", "topic": "#", "allow": True},
                    ],
                },
                {
                    "command": "createClient",
                    "username": SPY,
                    "password": broker.spy_password,
                    "roles": [{"rolename": "platform"}],
                },
            ]
        )
        assert not any(a.get("error") for a in answers), answers


def stop(broker: DynsecBroker) -> None:
    broker.proc.terminate()
    try:
        broker.proc.wait(10)
    except subprocess.TimeoutExpired:
        broker.proc.kill()


@pytest.fixture(scope="module")
def dynsec_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DynsecBroker]:
    broker = start_dynsec_mosquitto(tmp_path_factory.mktemp("dynsec"))
    try:
        yield broker
    finally:
        stop(broker)


@pytest.fixture
def broker_settings(settings: Any, dynsec_broker: DynsecBroker) -> DynsecBroker:
    """Point the platform's provisioning at the private broker."""
    settings.MQTT_URL = f"mqtt://{SPY}:{dynsec_broker.spy_password}@127.0.0.1:{dynsec_broker.port}"
    settings.MQTT_ADMIN_URL = dynsec_broker.url
    settings.MQTT_ADMIN_USERNAME = ADMIN
    settings.MQTT_ADMIN_PASSWORD = dynsec_broker.admin_password
    return dynsec_broker


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Peer:
    """One MQTT client: connects, records what it receives, subscribes and publishes and waits."""

    def __init__(self, broker: DynsecBroker, username: str, password: str) -> None:
        self.broker = broker
        self.messages: list[tuple[str, bytes]] = []
        self.connack: Any = None
        self.disconnects: list[str] = []
        self._cond = threading.Condition()
        self._subacks: dict[int, list[Any]] = {}
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=unique(username), protocol=mqtt.MQTTv5
        )
        client.username_pw_set(username, password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def connect(self) -> Any:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        assert self.wait(lambda: self.connack is not None), "no CONNACK"
        return self.connack

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str) -> list[Any]:
        _, mid = self.client.subscribe(topic, qos=1)
        assert self.wait(lambda: mid in self._subacks), f"no SUBACK for {topic}"
        return self._subacks[mid]

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), f"no PUBACK for {topic}"

    def barrier(self, watcher: Peer, topic: str) -> None:
        """Publish a marker on an allowed topic and wait until `watcher` has it."""
        marker = f"marker-{uuid.uuid4().hex}".encode()
        self.publish(topic, marker)
        assert watcher.wait(lambda: (topic, marker) in watcher.messages), f"no marker on {topic}"

    def received(self, topic: str) -> list[bytes]:
        with self._cond:
            return [p for t, p in self.messages if t == topic]

    def wait(self, ready: Callable[[], bool], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(ready, timeout)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        # No automatic reconnect: a kicked client must stay out, tests log in again explicitly.
        # (Marks the session as ending, which also lets loop_stop return at once.)
        client.disconnect()
        with self._cond:
            self.disconnects.append(str(rc))
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cond:
            self._subacks[mid] = list(rcs)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload))
            self._cond.notify_all()


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    """Makes peers and closes them all after the test."""
    made: list[Peer] = []

    def make(broker: DynsecBroker, username: str, password: str) -> Peer:
        peer = Peer(broker, username, password)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def spy(broker_settings: DynsecBroker, peers: Callable[..., Peer]) -> Peer:
    """The platform's view: may read every topic (role "platform")."""
    peer = peers(broker_settings, SPY, broker_settings.spy_password)
    assert not peer.connect().is_failure
    assert not peer.subscribe("#")[0].is_failure
    return peer


@pytest.fixture
def committed(django_capture_on_commit_callbacks: Any) -> Callable[..., Any]:
    """Runs a credential action and its after-commit broker sync, as a commit would, inside the
    test's transaction (much cheaper than a transactional test on PostgreSQL)."""

    def run(action: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with django_capture_on_commit_callbacks(execute=True):
            outcome = action(*args, **kwargs)
        return outcome

    return run
