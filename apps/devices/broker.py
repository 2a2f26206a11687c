"""Per-device MQTT logins in Mosquitto, through its dynamic-security plugin (SPEC §9).

The database is the source of truth (`DeviceCredential`); this module makes the broker match it:

    with DynsecAdmin.from_settings() as admin:
        steps = plan(admin, username, desired_state(device, username, uuid, password))
        apply(admin, steps)

Each device gets a dynsec client (username = device id) and a role `device-<username>` that
allows exactly its profile's topics and explicitly denies everything else, so the role does not
depend on the broker's global defaults (which let clients receive and unsubscribe anything).
Clients and roles the platform manages carry `MARKER` as their text name: a name already taken
by anything else (the platform's own client, the dynsec admin) is refused, never overwritten.

`plan` compares before it changes anything, because every change to a dynsec *client* — its
password, its roles, even its description — disconnects that client: re-running provisioning
must not knock a fleet offline. The broker cannot tell whether a password matches, so the
client's description carries an HMAC of (credential, password); a new password changes it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from django.conf import settings
from django.utils.crypto import salted_hmac
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from apps.core.crypto import Secret

from .models import Device, Profile
from .mqtt import mqtt_params

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
MARKER = "iotplatform device"
ROLE_PREFIX = "device-"
TIMEOUT = 10.0

# A Tasmota device whose topic is one of these would, through the FullTopic variant
# `{topic}/stat/#`, reach other devices' topics: "home" -> home/stat/… of a lamp called "stat",
# "iot" -> iot/tele/… of a meter called "tele", "cmnd" -> cmnd/stat/# (commands to the Tasmota
# whose topic is "stat"). Such a device is refused a broker login.
RESERVED_TASMOTA_TOPICS = frozenset({"cmnd", "stat", "tele", "home", "iot"})

ALLOW, DENY = 10, 0  # ACL priorities: higher is checked first
_HMAC_RE = re.compile(r"\bpassword-hmac=([0-9a-f]+)\b")


class BrokerError(Exception):
    """The broker could not be reached, refused the admin, or refused a change."""


class BrokerNotConfigured(BrokerError):
    """No dynamic-security admin is configured (the embedded broker has no ACLs)."""


class BrokerConflict(BrokerError):
    """The name belongs to a broker client or role that the platform does not manage."""


class UnsafeDevice(ValueError):
    """The device's topics would overlap other devices' topics; it gets no broker login."""


# --- what a device may do ------------------------------------------------------------------------


def device_topics(device: Device) -> tuple[list[str], list[str]]:
    """(topic filters the device may publish on, filters it may subscribe to), per profile."""
    if device.profile == Profile.ESP32_LAMP:
        i = device.device_id
        return [f"home/{i}/status", f"home/{i}/lwt"], [f"home/{i}/cmd"]
    if device.profile == Profile.TASMOTA:
        t = device.topic or device.device_id
        if t in RESERVED_TASMOTA_TOPICS:
            raise UnsafeDevice(
                f"{device.device_id}: a Tasmota topic {t!r} would reach other devices' topics "
                f"(reserved: {', '.join(sorted(RESERVED_TASMOTA_TOPICS))}); change the topic"
            )
        # Both FullTopic orders: which one a device uses is only learnt from its messages.
        return (
            [f"stat/{t}/#", f"tele/{t}/#", f"{t}/stat/#", f"{t}/tele/#"],
            [f"cmnd/{t}/#", f"{t}/cmnd/#"],
        )
    if device.profile == Profile.METER_V2:
        i = device.device_id
        channels = ("telemetry", "hello", "status", "command/ack", "ota/status")
        return [f"iot/{i}/{c}" for c in channels], [f"iot/{i}/command"]
    raise UnsafeDevice(f"{device.device_id}: unknown profile {device.profile!r}")


def device_acls(device: Device) -> list[dict[str, Any]]:
    publish, subscribe = device_topics(device)

    def acl(acltype: str, topic: str, allow: bool) -> dict[str, Any]:
        priority = ALLOW if allow else DENY
        return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}

    acls = [acl("publishClientSend", t, True) for t in publish]
    for t in subscribe:
        acls += [acl("subscribePattern", t, True), acl("publishClientReceive", t, True)]
    # Whether `#` covers `$SYS/…` and `$CONTROL/…` differs between Mosquitto's checks; either
    # way those are denied, here or by the broker's defaults (tests/devices/test_broker_acls.py).
    acls += [
        acl("publishClientSend", "#", False),
        acl("publishClientReceive", "#", False),
        acl("subscribePattern", "#", False),
    ]
    return acls


def role_name(username: str) -> str:
    return f"{ROLE_PREFIX}{username}"


def password_hmac(credential_uuid: uuid.UUID | str, password: str) -> str:
    """Tells whether the broker has the current password without keeping it there (keyed)."""
    value = f"{credential_uuid}:{password}"
    return salted_hmac("iotplatform.broker.password", value, algorithm="sha256").hexdigest()[:32]


@dataclass(frozen=True)
class Desired:
    """The broker state one active credential asks for. `password` None: a new one, unknown yet."""

    username: str
    rolename: str
    acls: list[dict[str, Any]]
    role_description: str
    description: str  # the client's: the role's, plus the credential and its password digest
    digest: str
    password: Secret | None = field(repr=False)


def desired_state(
    device: Device, username: str, credential_uuid: uuid.UUID | str | None, password: Secret | None
) -> Desired:
    digest = password_hmac(credential_uuid, password.reveal()) if password is not None else "new"
    about = f"owner={device.owner.slug} device={device.device_id}"
    description = f"{about} credential={credential_uuid or 'new'} password-hmac={digest}"
    acls = device_acls(device)
    return Desired(username, role_name(username), acls, about, description, digest, password)


# --- talking to the dynamic-security plugin ----------------------------------------------------


class DynsecAdmin:
    """One MQTT connection as the dynsec admin; `run` sends commands and waits for the answers.

    Every admin connection subscribed to the response topic receives every answer, so ours are
    told apart by a correlation id per command.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        tls: bool = False,
        timeout: float = TIMEOUT,
    ) -> None:
        self.host, self.port, self.username, self.tls = host, port, username, tls
        self._password = password
        self.timeout = timeout
        self._client: mqtt.Client | None = None
        self._cond = threading.Condition()
        self._answers: dict[str, dict[str, Any]] = {}
        self._connack: ReasonCode | None = None
        self._suback: list[ReasonCode] | None = None
        self._lost: str | None = None

    @classmethod
    def from_settings(cls, timeout: float | None = None) -> DynsecAdmin:
        if not settings.MQTT_ADMIN_PASSWORD:
            raise BrokerNotConfigured(
                "broker provisioning is off: set MQTT_ADMIN_PASSWORD (and MQTT_ADMIN_USERNAME, "
                "MQTT_ADMIN_URL) to the login of Mosquitto's dynamic-security admin"
            )
        url = settings.MQTT_ADMIN_URL or settings.MQTT_URL
        try:
            params = mqtt_params(url)
        except ValueError as exc:
            raise BrokerNotConfigured(f"MQTT_ADMIN_URL / MQTT_URL: {exc}") from None
        if settings.MQTT_ADMIN_URL and (params["username"] or params["password"]):
            raise BrokerNotConfigured(
                "MQTT_ADMIN_URL must not contain a login: use MQTT_ADMIN_USERNAME/_PASSWORD"
            )
        return cls(
            params["host"],
            params["port"],
            settings.MQTT_ADMIN_USERNAME,
            settings.MQTT_ADMIN_PASSWORD,
            tls=params["tls"],
            timeout=timeout or TIMEOUT,
        )

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def __enter__(self) -> DynsecAdmin:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self._client is not None:
            return
        with self._cond:  # a reopened admin starts from a clean slate
            self._connack, self._suback, self._lost, self._answers = None, None, None, {}
        client_id = f"{settings.MQTT_CLIENT_ID_PREFIX}-dynsec-{uuid.uuid4().hex[:12]}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(self.username, self._password)
        if self.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.connect_timeout = self.timeout
        try:
            client.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot reach the broker at {self.where}: {exc}") from None
        self._client = client
        client.loop_start()
        try:
            self._wait(lambda: self._connack is not None, "answer to the admin login")
            assert self._connack is not None
            if self._connack.is_failure:
                raise BrokerError(
                    f"the broker at {self.where} refused the login of {self.username!r}: "
                    f"{self._connack}"
                )
            client.subscribe(RESPONSE_TOPIC, qos=1)
            self._wait(lambda: self._suback is not None, "answer to the subscription")
            if any(rc.is_failure for rc in self._suback or []):
                raise BrokerError(
                    f"{self.username!r} may not read {RESPONSE_TOPIC}: "
                    "is it the dynamic-security admin?"
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one message; their answers in the same order (errors included)."""
        if self._client is None:
            raise BrokerError("not connected to the broker")
        ids = [uuid.uuid4().hex for _ in commands]
        body = {
            "commands": [{**c, "correlationData": i} for c, i in zip(commands, ids, strict=True)]
        }
        info = self._client.publish(CONTROL_TOPIC, json.dumps(body), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"could not send to {self.where}: {mqtt.error_string(info.rc)}")
        # A PUBLISH the admin may not make is dropped silently (with a PUBACK): only the
        # answer proves the plugin took the commands.
        self._wait(
            lambda: all(i in self._answers for i in ids),
            f"answer from the dynamic-security plugin on {CONTROL_TOPIC} (is the plugin "
            f"loaded, and is {self.username!r} its admin?)",
        )
        with self._cond:
            return [self._answers.pop(i) for i in ids]

    def get(self, command: dict[str, Any], missing: str) -> dict[str, Any] | None:
        """One read command's data, or None when the broker answers `missing`."""
        (answer,) = self.run([command])
        return _data(answer, missing)

    # --- paho callbacks (network thread) ---------------------------------------------------------

    def _wait(self, ready: Any, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: ready() or self._lost is not None, self.timeout):
                raise BrokerError(f"no {what} within {self.timeout:g} s from {self.where}")
            if self._lost is not None and not ready():
                raise BrokerError(f"lost the connection to {self.where}: {self._lost}")

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        with self._cond:
            self._connack = rc
            self._cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any
    ) -> None:
        with self._cond:
            self._suback = list(rcs)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            logger.warning("dynsec: unreadable answer on %s", msg.topic)
            return
        with self._cond:
            for answer in responses:
                if isinstance(answer, dict) and isinstance(answer.get("correlationData"), str):
                    self._answers[answer["correlationData"]] = answer
            self._cond.notify_all()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        with self._cond:
            self._lost = str(rc)
            self._cond.notify_all()


def _data(answer: dict[str, Any], missing: str = "") -> dict[str, Any] | None:
    error = answer.get("error")
    if error:
        if missing and error == missing:
            return None
        raise BrokerError(f"dynsec {answer.get('command')}: {error}")
    return answer.get("data") or {}


# --- plans: the commands that bring the broker in line ----------------------------------------


@dataclass(frozen=True)
class Step:
    """One dynsec command and what it does, in words. The words never contain the password."""

    text: str
    command: dict[str, Any] = field(repr=False)


def _acl_set(acls: list[dict[str, Any]]) -> set[tuple[str, str, bool, int]]:
    return {(a["acltype"], a["topic"], bool(a["allow"]), int(a.get("priority", 0))) for a in acls}


def _check_ours(kind: str, name: str, entry: dict[str, Any] | None) -> None:
    if entry is not None and entry.get("textname") != MARKER:
        raise BrokerConflict(
            f"the broker already has a {kind} {name!r} that the platform did not create; "
            "refusing to change it (rename the device, or remove that broker entry)"
        )


def plan(admin: DynsecAdmin, username: str, desired: Desired | None) -> list[Step]:
    """What to change so that the broker has `desired` (None: no login at all) for `username`."""
    rolename = role_name(username)
    client_answer, role_answer = admin.run(
        [
            {"command": "getClient", "username": username},
            {"command": "getRole", "rolename": rolename},
        ]
    )
    client = (_data(client_answer, "Client not found") or {}).get("client")
    role = (_data(role_answer, "Role not found") or {}).get("role")
    _check_ours("client", username, client)
    _check_ours("role", rolename, role)

    if desired is None:
        steps = []
        if client is not None:
            steps.append(
                Step(
                    f"deleted client {username} (disconnected)",
                    {"command": "deleteClient", "username": username},
                )
            )
        if role is not None:
            steps.append(
                Step(f"deleted role {rolename}", {"command": "deleteRole", "rolename": rolename})
            )
        return steps

    steps = []
    texts = {"textname": MARKER, "textdescription": desired.role_description}
    if role is None:
        steps.append(
            Step(
                f"created role {rolename} ({len(desired.acls)} ACLs)",
                {"command": "createRole", "rolename": rolename, **texts, "acls": desired.acls},
            )
        )
    elif _acl_set(role.get("acls", [])) != _acl_set(desired.acls):
        # Takes effect at once for a connected client, without disconnecting it.
        steps.append(
            Step(
                f"updated ACLs of role {rolename}",
                {"command": "modifyRole", "rolename": rolename, **texts, "acls": desired.acls},
            )
        )
    roles = [{"rolename": rolename, "priority": 0}]
    password = desired.password.reveal() if desired.password is not None else None
    if client is None:
        if password is None:
            # A dry run of a password not generated yet: the step is shown, never sent.
            steps.append(Step(f"created client {username}", {}))
        else:
            steps.append(
                Step(
                    f"created client {username}",
                    {
                        "command": "createClient",
                        "username": username,
                        "password": password,
                        "textname": MARKER,
                        "textdescription": desired.description,
                        "roles": roles,
                    },
                )
            )
        return steps

    # Only the password digest and the roles count: any change to a client disconnects it, so a
    # description that is merely out of date (an owner renamed) waits for the next real change.
    held = _HMAC_RE.search(client.get("textdescription") or "")
    change: dict[str, Any] = {}
    if password is None or held is None or held.group(1) != desired.digest:
        change["password"] = password
    # Groups could carry ACLs of their own: a device client belongs to none.
    if [r.get("rolename") for r in client.get("roles", [])] != [rolename] or client.get("groups"):
        change |= {"roles": roles, "groups": []}
    if change:
        what = " and ".join(k for k in ("password", "roles") if k in change)
        text = f"updated {what} of client {username} (disconnected)"
        command = {"command": "modifyClient", "username": username, **change}
        command["textdescription"] = desired.description
        steps.append(Step(text, command if password is not None else {}))
    if client.get("disabled"):
        steps.append(
            Step(f"enabled client {username}", {"command": "enableClient", "username": username})
        )
    return steps


def apply(admin: DynsecAdmin, steps: list[Step]) -> None:
    """Run the steps in one message; the first refusal is raised (a rerun completes the rest)."""
    commands = [s.command for s in steps]
    if not all(commands):
        raise BrokerError("this plan waits for a new password: it can be shown, not applied")
    if not commands:
        return
    answers = admin.run(commands)
    errors = [
        f"{s.text}: {a['error']}" for s, a in zip(steps, answers, strict=True) if a.get("error")
    ]
    for step, answer in zip(steps, answers, strict=True):
        if not answer.get("error"):
            logger.info("dynsec: %s", step.text)
    if errors:
        raise BrokerError("the broker refused: " + "; ".join(errors))


def managed(admin: DynsecAdmin) -> tuple[set[str], set[str]]:
    """(usernames, role names) of every client and role the platform manages in the broker."""
    clients_answer, roles_answer = admin.run(
        [
            {"command": "listClients", "verbose": True, "count": -1},
            {"command": "listRoles", "verbose": True, "count": -1},
        ]
    )
    clients = (_data(clients_answer) or {}).get("clients", [])
    roles = (_data(roles_answer) or {}).get("roles", [])
    return (
        {c["username"] for c in clients if c.get("textname") == MARKER},
        {r["rolename"] for r in roles if r.get("textname") == MARKER},
    )
