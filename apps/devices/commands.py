"""Commands to devices: issue, publish, confirm, expire (SPEC §6, issue 5).

The life of a command (`CommandStatus`)::

    pending ──PUBACK──> published ──device reports it──> confirmed
       │                    └── confirm_by passes ──> unconfirmed ──late report by id──> confirmed
       └── broker refused / no PUBACK ──> failed          (meter ack "error" ──> failed)
    queued (offline device, policy "queue") ──device online──> pending ──> …
       └── expires_at passes ──> expired

Entry points:
- `execute_command(...)`: a user, API key or the system switches one device. Raises
  `CommandRefused` (with a `code`) for anything it will not do; the caller shows the message.
- `build_command` + `publish_commands`: the schedule runner's bulk path (same rules).
- `after_ingest(events)`: the listener, inside each batch transaction — confirmations, and
  held commands sent once their device is back online.
- `sweep()`: the periodic task — deadlines (unconfirmed / expired) and held commands.

Confirmation: esp32-lamp echoes our `requestId` in its status and meter-v2 acks the
`command_id`, so those are matched by request id only. Tasmota carries no id: a Tasmota command
is confirmed when the device reports the relay in the expected state after it was sent.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.owners.models import Role
from apps.owners.scoping import has_role

from . import live
from .events import COMMAND_ACK, CONNECTION, STATUS, DeviceEvent
from .models import Command, CommandStatus, Connection, Device, IssuerType, OfflinePolicy, Profile
from .profiles import PROFILES
from .publisher import Message, get_publisher

log = logging.getLogger(__name__)

LAMP_ACTIONS = ("ON", "OFF", "TOGGLE")
METER_COMMAND_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
MAX_PARAMS_BYTES = 4096
# Profiles whose devices echo the request id; their commands are confirmed by id only.
CONFIRM_BY_ID = frozenset({Profile.ESP32_LAMP, Profile.METER_V2})
# Clock tolerance between the process that published and the listener that stamped a report.
REPORT_SKEW = timedelta(seconds=1)
# Statuses a report may still confirm (a late report by id rescues an "unconfirmed").
CONFIRMABLE_BY_ID = (CommandStatus.PENDING, CommandStatus.PUBLISHED, CommandStatus.UNCONFIRMED)
CONFIRMABLE_BY_STATE = (CommandStatus.PENDING, CommandStatus.PUBLISHED)


def confirm_seconds() -> int:
    return int(getattr(settings, "COMMAND_CONFIRM_SECONDS", 10))


def hold_seconds() -> int:
    return int(getattr(settings, "COMMAND_HOLD_SECONDS", 300))


def publish_timeout() -> float:
    return float(getattr(settings, "COMMAND_PUBLISH_TIMEOUT", 5.0))


class CommandRefused(Exception):
    """The platform will not send this command. `code` says why; the message is for people."""

    FORBIDDEN = "forbidden"  # the issuer may not switch this device
    OFFLINE = "offline"  # the device is offline and its policy refuses commands
    INVALID = "invalid"  # the action, relay or parameters do not fit the device

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Issuer:
    """Who or what issued a command, as recorded in the log.

    Users are checked for the operator role on the device's owner; schedules and API keys
    carry the owner they belong to and may only command that owner's devices.
    """

    type: str
    id: str = ""
    label: str = ""
    user: Any = None
    owner_id: int | None = None

    @classmethod
    def for_user(cls, user: Any) -> Issuer:
        return cls(IssuerType.USER, str(user.pk), user.get_username(), user=user)

    @classmethod
    def for_schedule(cls, schedule: Any) -> Issuer:
        label = schedule.name or f"schedule {schedule.pk}"
        return cls(IssuerType.SCHEDULE, str(schedule.pk), label[:150], owner_id=schedule.owner_id)

    @classmethod
    def for_api_key(cls, *, key_id: Any, label: str, owner_id: int) -> Issuer:
        return cls(IssuerType.API_KEY, str(key_id), label[:150], owner_id=owner_id)

    @classmethod
    def system(cls, label: str) -> Issuer:
        return cls(IssuerType.SYSTEM, "", label[:150])


def as_issuer(issuer: Issuer | Any) -> Issuer:
    return issuer if isinstance(issuer, Issuer) else Issuer.for_user(issuer)


# --- issuing ----------------------------------------------------------------------------------


def execute_command(
    *,
    device: Device,
    action: str,
    issuer: Issuer | Any,
    relay: int | None = None,
    params: dict[str, Any] | None = None,
    ttl: int | None = None,
) -> Command:
    """Send one command to `device` and return its logged row.

    `action`: "ON", "OFF" or "TOGGLE" for lamps and relays (`relay` 1..relay_count for
    multi-relay Tasmota, default 1); for meter-v2 the command name (e.g. "reboot") with
    `params`. `issuer`: an `Issuer`, or a user (then the user needs the operator role or
    higher on the device's owner). `ttl`: seconds a held command waits for an offline device
    (default COMMAND_HOLD_SECONDS).

    Publishing waits for the broker's PUBACK (at most COMMAND_PUBLISH_TIMEOUT) after the
    caller's transaction commits, so outside a transaction the returned command is already
    `published` (or `failed`); a device on the "queue" policy that is offline gives `queued`.
    Confirmation arrives later through the listener (live pages receive a `command` message).

    Raises `CommandRefused` (codes FORBIDDEN, OFFLINE, INVALID); nothing is logged then.
    """
    who = as_issuer(issuer)
    with transaction.atomic():
        # A fresh row: the offline policy and TOGGLE's expected state read the current state.
        fresh = Device.objects.get(pk=device.pk)
        command = build_command(fresh, action, issuer=who, relay=relay, params=params, ttl=ttl)
        command.save()
        if command.status == CommandStatus.QUEUED:
            _push([command])
        else:
            transaction.on_commit(lambda: publish_commands([command]))
    return command


def check_allowed(device: Device, issuer: Issuer) -> None:
    if issuer.type == IssuerType.USER:
        if not has_role(issuer.user, device.owner_id, Role.OPERATOR):
            raise CommandRefused(
                CommandRefused.FORBIDDEN, "Only operators, admins and owners may switch devices."
            )
    elif issuer.type != IssuerType.SYSTEM and issuer.owner_id != device.owner_id:
        raise CommandRefused(CommandRefused.FORBIDDEN, "This device belongs to another owner.")


def build_command(
    device: Device,
    action: str,
    *,
    issuer: Issuer,
    relay: int | None = None,
    params: dict[str, Any] | None = None,
    ttl: int | None = None,
    now: datetime | None = None,
) -> Command:
    """An unsaved, validated command: `pending` to publish, or `queued` for an offline device."""
    check_allowed(device, issuer)
    action, relay, params = _validate(device, action, relay, params)
    now = now or timezone.now()
    offline = device.connection == Connection.OFFLINE
    if offline and device.offline_policy != OfflinePolicy.QUEUE:
        raise CommandRefused(
            CommandRefused.OFFLINE,
            f"{device} is offline, and its policy refuses commands while it is offline.",
        )
    command = Command(
        owner_id=device.owner_id,
        device=device,
        action=action,
        relay=relay,
        params=params,
        expected=_expected_state(device, action, relay),
        issuer_type=issuer.type,
        issuer_id=issuer.id,
        issuer_label=issuer.label,
        status=CommandStatus.QUEUED if offline else CommandStatus.PENDING,
        issued_at=now,
        expires_at=now + timedelta(seconds=ttl if ttl is not None else hold_seconds()),
    )
    command.request_id = uuid.uuid4()
    _render(command, device)
    return command


def _validate(
    device: Device, action: str, relay: int | None, params: dict[str, Any] | None
) -> tuple[str, int | None, dict[str, Any]]:
    def invalid(message: str) -> CommandRefused:
        return CommandRefused(CommandRefused.INVALID, message)

    if not isinstance(action, str) or not action.strip():
        raise invalid("An action is required.")
    if device.profile == Profile.METER_V2:
        name = action.strip()
        if not METER_COMMAND_RE.match(name):
            raise invalid(
                "Meters take named commands such as 'reboot' (lowercase letters, digits, '_', "
                "'.', '-')."
            )
        if relay is not None:
            raise invalid("Meters have no relays.")
        params = params or {}
        if not isinstance(params, dict):
            raise invalid("Command parameters must be a JSON object.")
        try:
            size = len(orjson.dumps(params))
        except TypeError as exc:
            raise invalid(f"Command parameters are not JSON: {exc}") from None
        if size > MAX_PARAMS_BYTES:
            raise invalid(f"Command parameters are too large ({size} > {MAX_PARAMS_BYTES} bytes).")
        return name, None, params

    action = action.strip().upper()
    if action not in LAMP_ACTIONS:
        raise invalid(f"Action must be one of {', '.join(LAMP_ACTIONS)}.")
    if params:
        raise invalid("Lamps and relays take no parameters.")
    relay = 1 if relay is None else relay
    if (
        isinstance(relay, bool)
        or not isinstance(relay, int)
        or not 1 <= relay <= device.relay_count
    ):
        raise invalid(f"Relay must be between 1 and {device.relay_count} for {device}.")
    return action, relay, {}


def _expected_state(device: Device, action: str, relay: int | None) -> str:
    if action in ("ON", "OFF"):
        return action
    if action == "TOGGLE":
        current = (device.power or {}).get(str(relay or 1))
        return {"ON": "OFF", "OFF": "ON"}.get(current or "", "")
    return ""


def _render(command: Command, device: Device) -> None:
    """Topic and payload from the device's profile (re-rendered when a held command is sent)."""
    profile = PROFILES[device.profile]
    messages = profile.command_messages(
        device,
        command.action,
        relay=command.relay,
        request_id=str(command.request_id),
        name=command.action if device.profile == Profile.METER_V2 else None,
        params=command.params or None,
    )
    topic, payload = messages[0]
    command.topic = topic
    command.payload = payload.decode("utf-8", errors="replace")


# --- publishing -------------------------------------------------------------------------------


def publish_commands(commands: Sequence[Command], *, now: datetime | None = None) -> None:
    """Publish `pending` commands (already committed) and record what the broker said.

    Call outside any transaction: it waits for PUBACKs. All messages are pipelined on the one
    connection. A command confirmed meanwhile (a very fast device) keeps its confirmation.
    """
    commands = [c for c in commands if c.status == CommandStatus.PENDING]
    if not commands:
        return
    sent_at = now or timezone.now()
    messages = [Message(c.topic, c.payload.encode(), expiry=confirm_seconds()) for c in commands]
    results = get_publisher().publish_many(messages, timeout=publish_timeout())
    resolved = timezone.now()

    ok = [c for c, err in zip(commands, results, strict=True) if err is None]
    if ok:
        ids = [c.pk for c in ok]
        confirm_by = sent_at + timedelta(seconds=confirm_seconds())
        Command.objects.filter(pk__in=ids, published_at__isnull=True).update(published_at=sent_at)
        Command.objects.filter(pk__in=ids, status=CommandStatus.PENDING).update(
            status=CommandStatus.PUBLISHED, confirm_by=confirm_by
        )
        for c in ok:
            c.status, c.published_at, c.confirm_by = CommandStatus.PUBLISHED, sent_at, confirm_by
    failed = defaultdict(list)
    for c, err in zip(commands, results, strict=True):
        if err is not None:
            failed[str(err)[:255]].append(c)
    for detail, group in failed.items():
        log.warning("%d command(s) failed to publish: %s", len(group), detail)
        Command.objects.filter(pk__in=[c.pk for c in group], status=CommandStatus.PENDING).update(
            status=CommandStatus.FAILED, detail=detail, resolved_at=resolved
        )
        for c in group:
            c.status, c.detail, c.resolved_at = CommandStatus.FAILED, detail, resolved
    _push(commands)


def send_held_commands(device_pks: Iterable[int], *, now: datetime | None = None) -> int:
    """Send the held (`queued`) commands of these devices that are online again.

    Each command is claimed with a conditional UPDATE (queued -> pending) before it is
    published, so concurrent callers (the listener's hook, the sweep) send it once.
    """
    now = now or timezone.now()
    held = (
        Command.objects.filter(
            device_id__in=list(device_pks), status=CommandStatus.QUEUED, expires_at__gt=now
        )
        .exclude(device__connection=Connection.OFFLINE)
        .select_related("device")
        .order_by("issued_at", "id")
    )
    claimed: list[Command] = []
    for command in held:
        _render(command, command.device)  # the device may have changed topic order meanwhile
        if Command.objects.filter(pk=command.pk, status=CommandStatus.QUEUED).update(
            status=CommandStatus.PENDING, topic=command.topic, payload=command.payload
        ):
            command.status = CommandStatus.PENDING
            claimed.append(command)
    publish_commands(claimed, now=now)
    return len(claimed)


# --- confirmation (the listener, inside its batch transaction) ---------------------------------


def after_ingest(events: Sequence[DeviceEvent]) -> None:
    """Confirm commands from the batch's reports; send held commands to devices back online."""
    by_id: dict[uuid.UUID, DeviceEvent] = {}
    reports: dict[int, list[DeviceEvent]] = defaultdict(list)
    back_online: set[int] = set()
    for event in events:
        if event.type == STATUS and event.profile in CONFIRM_BY_ID:
            _index_request_id(by_id, event, event.data.get("requestId"))
        elif event.type == COMMAND_ACK:
            _index_request_id(by_id, event, event.data.get("command_id"))
        elif event.type == STATUS and isinstance(event.data.get("power"), dict):
            reports[event.device_pk].append(event)
        elif event.type == CONNECTION and event.data.get("new") == Connection.ONLINE:
            back_online.add(event.device_pk)

    changed: list[Command] = []
    if by_id:
        changed += _confirm_by_id(by_id)
    if reports:
        changed += _confirm_by_state(reports)
    if changed:
        _push(changed, device_ids={e.device_pk: e.device_id for e in events})
    if back_online:
        waiting = set(
            Command.objects.filter(device_id__in=back_online, status=CommandStatus.QUEUED)
            .values_list("device_id", flat=True)
            .distinct()
        )
        if waiting:
            transaction.on_commit(lambda: _enqueue_send_held(sorted(waiting)))


def _index_request_id(index: dict[uuid.UUID, DeviceEvent], event: DeviceEvent, raw: Any) -> None:
    if not isinstance(raw, str):
        return
    try:
        index[uuid.UUID(raw)] = event
    except ValueError:
        return  # not one of ours (a device may echo ids it made up)


def _confirm_by_id(by_id: dict[uuid.UUID, DeviceEvent]) -> list[Command]:
    now = timezone.now()
    changed = []
    rows = Command.objects.filter(request_id__in=list(by_id), status__in=CONFIRMABLE_BY_ID)
    for command in rows:
        event = by_id[command.request_id]
        if event.device_pk != command.device_id:
            continue  # a device can only confirm its own commands
        status, detail = CommandStatus.CONFIRMED, ""
        if event.type == COMMAND_ACK and event.data.get("status") != "ok":
            status = CommandStatus.FAILED
            detail = f"device: {str(event.data.get('detail') or 'error')[:240]}"
        if Command.objects.filter(pk=command.pk, status__in=CONFIRMABLE_BY_ID).update(
            status=status, detail=detail, resolved_at=now
        ):
            command.status, command.detail, command.resolved_at = status, detail, now
            changed.append(command)
    return changed


def _confirm_by_state(reports: dict[int, list[DeviceEvent]]) -> list[Command]:
    now = timezone.now()
    open_commands = Command.objects.filter(
        device_id__in=list(reports), status__in=CONFIRMABLE_BY_STATE
    ).only(
        "id",
        "owner_id",
        "device_id",
        "action",
        "relay",
        "expected",
        "issued_at",
        "published_at",
        "request_id",
        "status",
    )
    confirmed = []
    for command in open_commands:
        sent = (command.published_at or command.issued_at) - REPORT_SKEW
        relay = str(command.relay or 1)
        for event in reports[command.device_id]:
            state = event.data["power"].get(relay)
            if state and event.received_at >= sent and command.expected in ("", state):
                confirmed.append(command)
                break
    if confirmed:
        Command.objects.filter(
            pk__in=[c.pk for c in confirmed], status__in=CONFIRMABLE_BY_STATE
        ).update(status=CommandStatus.CONFIRMED, resolved_at=now)
        for c in confirmed:
            c.status, c.resolved_at = CommandStatus.CONFIRMED, now
    return confirmed


def _enqueue_send_held(device_pks: list[int]) -> None:
    from iotplatform.celery import app

    try:
        # No retries: the listener must not wait for a Celery broker that is down.
        app.send_task("commands.send_held", args=[device_pks], retry=False)
    except Exception:
        # The sweep sends held commands of online devices too; this only makes it faster.
        log.exception("could not enqueue commands.send_held for %s", device_pks)


# --- deadlines (the periodic sweep) -------------------------------------------------------------


@dataclass
class SweepResult:
    unconfirmed: int = 0
    expired: int = 0
    sent: int = 0


def sweep(now: datetime | None = None) -> SweepResult:
    """Mark commands past their deadline; send held commands of devices that are online."""
    now = now or timezone.now()
    result = SweepResult()
    changed: list[Command] = []

    def resolve(qs, status: str, detail: str) -> int:
        rows = list(qs.select_related("device")[:5000])
        if not rows:
            return 0
        # The status condition stays in the UPDATE: a command confirmed in between keeps it.
        count = qs.filter(pk__in=[c.pk for c in rows]).update(
            status=status, detail=detail, resolved_at=now
        )
        for c in rows:
            c.status, c.detail = status, detail
        changed.extend(rows)
        return count

    result.expired = resolve(
        Command.objects.filter(status=CommandStatus.QUEUED, expires_at__lte=now),
        CommandStatus.EXPIRED,
        "the device stayed offline until the command expired",
    )
    result.unconfirmed = resolve(
        Command.objects.filter(status=CommandStatus.PUBLISHED, confirm_by__lte=now),
        CommandStatus.UNCONFIRMED,
        f"the device did not report it within {confirm_seconds()}s",
    )
    # A publisher that died between writing the row and recording the PUBACK: we cannot know
    # whether the message left, and never publish it again (at most once).
    stale = now - timedelta(seconds=publish_timeout() + confirm_seconds())
    result.unconfirmed += resolve(
        Command.objects.filter(status=CommandStatus.PENDING, issued_at__lte=stale),
        CommandStatus.UNCONFIRMED,
        "the publishing process stopped before recording the result",
    )
    if changed:
        with transaction.atomic():
            _push(changed)

    online_with_held = set(
        Command.objects.filter(status=CommandStatus.QUEUED, expires_at__gt=now)
        .exclude(device__connection=Connection.OFFLINE)
        .values_list("device_id", flat=True)
        .distinct()
    )
    if online_with_held:
        result.sent = send_held_commands(online_with_held, now=now)
    return result


# --- live pages -------------------------------------------------------------------------------


def _push(commands: Iterable[Command], *, device_ids: dict[int, str] | None = None) -> None:
    """One `command` message per command to its owner's pages, after the transaction commits."""
    by_owner: dict[int, list[live.Message]] = defaultdict(list)
    for c in commands:
        device_id = (device_ids or {}).get(c.device_id) or c.device.device_id
        by_owner[c.owner_id].append(
            live.command_message(
                device_id=device_id,
                command_id=str(c.request_id),
                action=c.action,
                status=c.status,
                relay=c.relay,
                detail=c.detail,
            )
        )
    for owner_id, messages in by_owner.items():
        group, payload = live.owner_group(owner_id), live.envelope(owner_id, messages)
        transaction.on_commit(lambda g=group, p=payload: _send_now(g, p))


def _send_now(group: str, payload: live.Message) -> None:
    try:
        async_to_sync(get_channel_layer().group_send)(group, payload)
    except Exception:
        log.exception("live push of command results to %s failed", group)
