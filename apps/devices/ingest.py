"""Turning a batch of raw MQTT messages into stored telemetry, device state and transitions.

`ingest_batch` is the listener's per-batch function, callable (and tested) without a broker:
one transaction per batch writes telemetry rows, quarantine rows, device state, transition rows
and, through the hooks, delivery outbox rows and command confirmations. Devices touched by the
batch are locked and read fresh (`SELECT … FOR UPDATE`), so several listener copies behind a
shared subscription agree on state changes and on meter sequence numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction

from apps.forwarding.outbox import write_outbox

from . import commands
from .events import CONNECTION, POWER, DeviceEvent
from .models import (
    Connection,
    Device,
    QuarantinedMessage,
    Telemetry,
    Transition,
    TransitionKind,
)
from .profiles import Parsed, Reject, route
from .profiles.base import INVALID, OVERSIZE, UNKNOWN_DEVICE

log = logging.getLogger(__name__)

# State that only says "still alive" is written at most this often per device; state that
# changes something (connection, power, sequence, firmware) is written in every batch.
SOFT_WRITE_INTERVAL = timedelta(seconds=5)
STATE_FIELDS = [
    "connection",
    "connection_changed_at",
    "power",
    "last_seen_at",
    "last_reading",
    "last_reading_at",
    "firmware",
    "device_type",
    "ip_address",
    "rssi",
    "uptime",
    "boot_id",
    "last_seq",
    "seq_gaps",
    "seq_missing",
    "seq_duplicates",
    "topic_order",
]


@dataclass(slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    received_at: datetime
    qos: int = 0
    mid: int = 0
    retained: bool = False


@dataclass(slots=True)
class BatchResult:
    stored: int = 0
    quarantined: int = 0
    duplicates: int = 0
    ignored: int = 0
    events: list[DeviceEvent] = field(default_factory=list)
    changed_devices: list[Device] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class _DeviceRef:
    pk: int
    owner_id: int


class DeviceDirectory:
    """Topic key -> device, cached per process; unknown keys are re-checked after a while."""

    NEGATIVE_TTL = 10.0
    POSITIVE_TTL = 300.0

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[_DeviceRef, float]] = {}
        self._unknown: dict[tuple[str, str], float] = {}

    def resolve(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], _DeviceRef]:
        now = time.monotonic()
        found: dict[tuple[str, str], _DeviceRef] = {}
        missing: dict[str, set[str]] = {}
        for k in keys:
            hit = self._known.get(k)
            if hit and now - hit[1] < self.POSITIVE_TTL:
                found[k] = hit[0]
            elif now - self._unknown.get(k, -1e9) >= self.NEGATIVE_TTL:
                missing.setdefault(k[0], set()).add(k[1])
        for profile, topics in missing.items():
            rows = Device.objects.filter(profile=profile, topic__in=topics).values_list(
                "pk", "owner_id", "topic"
            )
            for pk, owner_id, topic in rows:
                ref = _DeviceRef(pk, owner_id)
                self._known[(profile, topic)] = (ref, now)
                found[(profile, topic)] = ref
            for topic in topics:
                if (profile, topic) not in found:
                    self._unknown[(profile, topic)] = now
        return found

    def forget(self, profile: str, key: str) -> None:
        self._known.pop((profile, key), None)


_directory = DeviceDirectory()


def ingest_batch(
    messages: Sequence[InboundMessage], directory: DeviceDirectory | None = None
) -> BatchResult:
    directory = directory or _directory
    result = BatchResult()
    quarantine: list[QuarantinedMessage] = []
    accepted: list[tuple[InboundMessage, str, Parsed]] = []

    # Refused messages whose topic names a device: shown to that device's owner.
    attributable: list[tuple[QuarantinedMessage, tuple[str, str]]] = []
    for msg in messages:
        where: tuple[str, str] | None = None
        try:
            profile, key, channel = route(msg.topic)
            where = (profile.name, key)
            if len(msg.payload) > settings.MQTT_MAX_PAYLOAD:
                raise Reject(OVERSIZE, f"{len(msg.payload)} bytes > {settings.MQTT_MAX_PAYLOAD}")
            accepted.append((msg, profile.name, profile.parse(key, channel, msg.payload)))
        except Reject as exc:
            if len(msg.payload) > settings.MQTT_MAX_PAYLOAD and exc.reason != OVERSIZE:
                exc = Reject(OVERSIZE, f"{len(msg.payload)} bytes > {settings.MQTT_MAX_PAYLOAD}")
            row = _quarantine_row(msg, exc.reason, exc.detail)
            quarantine.append(row)
            if where:
                attributable.append((row, where))

    keys = {(profile, parsed.key) for _, profile, parsed in accepted}
    refs = directory.resolve(keys | {where for _, where in attributable})
    with transaction.atomic():
        pks = sorted({ref.pk for ref in refs.values()})
        # Lock in primary-key order: concurrent listener copies never deadlock on each other.
        devices = {
            d.pk: d for d in Device.objects.select_for_update().filter(pk__in=pks).order_by("pk")
        }
        state = {pk: _DeviceState(d) for pk, d in devices.items()}
        for row, where in attributable:
            ref = refs.get(where)
            if ref and ref.pk in devices:  # only devices that still exist (locked above)
                row.owner_id, row.device_id = ref.owner_id, ref.pk
        telemetry: list[tuple[Telemetry, _DeviceState, Parsed]] = []
        transitions: list[Transition] = []

        for msg, profile, parsed in accepted:
            ref = refs.get((profile, parsed.key))
            st = state.get(ref.pk) if ref else None
            if st is None:
                if ref:
                    directory.forget(profile, parsed.key)  # deleted since it was cached
                quarantine.append(
                    _quarantine_row(msg, UNKNOWN_DEVICE, f"no {profile} device {parsed.key!r}")
                )
                continue
            row = st.apply(msg, parsed, transitions)
            if row is None:
                if parsed.kind is None:
                    result.ignored += 1
                else:
                    result.duplicates += 1
                continue
            telemetry.append((row, st, parsed))

        Telemetry.objects.bulk_create([t[0] for t in telemetry], batch_size=1000)
        Transition.objects.bulk_create(transitions, batch_size=1000)
        if quarantine:
            QuarantinedMessage.objects.bulk_create(quarantine, batch_size=500)

        changed = [st for st in state.values() if st.needs_write()]
        if changed:
            Device.objects.bulk_update([st.device for st in changed], STATE_FIELDS, batch_size=500)

        events = [_telemetry_event(row, st.device, parsed) for row, st, parsed in telemetry]
        events += [_transition_event(t, devices[t.device_id]) for t in transitions]
        if events:
            write_outbox(events)
            commands.after_ingest(events)

    result.stored = len(telemetry)
    result.quarantined = len(quarantine)
    result.events = events
    result.changed_devices = [st.device for st in changed if st.visible_change]
    return result


class _DeviceState:
    """A locked device row and what this batch does to it."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.hard = False  # something that must be written now changed
        self.soft = False  # only liveness/reading changed
        self.visible_change = False  # worth pushing to live pages
        self._last_written_seen = device.last_seen_at

    def needs_write(self) -> bool:
        if self.hard:
            return True
        if not self.soft:
            return False
        last = self._last_written_seen
        return last is None or self.device.last_seen_at - last >= SOFT_WRITE_INTERVAL

    def apply(
        self, msg: InboundMessage, p: Parsed, transitions: list[Transition]
    ) -> Telemetry | None:
        d = self.device
        at = msg.received_at
        # A retained message is old news replayed by the broker (e.g. after a listener restart):
        # it is not a sign of life, and "online" from it must not undo an inactivity timeout.
        alive = not msg.retained and p.connection != "offline"
        if alive and (d.last_seen_at is None or at > d.last_seen_at):
            d.last_seen_at = at
            self.soft = True
        if p.connection and (
            not msg.retained or p.connection == "offline" or d.connection == Connection.UNKNOWN
        ):
            self._set_connection(p.connection, p.channel, at, transitions)

        if (p.seq is not None or p.new_boot) and not self._accept_seq(p):
            return None

        if p.power:
            for relay, value in sorted(p.power.items()):
                old = d.power.get(relay, "")
                if old != value:
                    d.power = {**d.power, relay: value}
                    transitions.append(
                        self._transition(
                            TransitionKind.POWER, old, value, p.channel, at, int(relay)
                        )
                    )
        if p.topic_order and p.topic_order != d.topic_order:
            d.topic_order = p.topic_order
            self.hard = True
        for attr, value in (
            ("firmware", p.firmware),
            ("device_type", p.device_type),
            ("ip_address", p.ip),
        ):
            if value is not None and getattr(d, attr) != value:
                setattr(d, attr, value)
                self.hard = self.visible_change = True
        if p.rssi is not None:
            d.rssi = p.rssi
        if p.uptime is not None:
            d.uptime = p.uptime
        if p.reading:
            d.last_reading = p.reading
            d.last_reading_at = at
            self.soft = self.visible_change = True

        if p.kind is None:
            return None
        return Telemetry(
            owner_id=d.owner_id,
            device_id=d.pk,
            kind=p.kind,
            ts=p.ts or at,
            received_at=at,
            seq=p.seq,
            topic=msg.topic[:255],
            data=p.data,
        )

    def _accept_seq(self, p: Parsed) -> bool:
        """meter-v2 sequence tracking: duplicates dropped, gaps counted, new boot restarts."""
        d = self.device
        new_boot = bool(p.boot_id and p.boot_id != d.boot_id)
        if p.new_boot and p.seq is not None and d.last_seq is not None and p.seq <= d.last_seq:
            new_boot = True  # a hello whose seq went back: the device restarted its counter
        if new_boot:
            d.boot_id = p.boot_id or d.boot_id
            d.last_seq = p.seq
            self.hard = self.visible_change = True
            return True
        if p.seq is None:
            return True
        if d.last_seq is not None and p.seq <= d.last_seq:
            d.seq_duplicates += 1
            self.hard = True
            return False
        if d.last_seq is not None and p.seq > d.last_seq + 1:
            d.seq_gaps += 1
            d.seq_missing += p.seq - d.last_seq - 1
        d.last_seq = p.seq
        self.hard = True
        return True

    def _set_connection(
        self, new: str, cause: str, at: datetime, transitions: list[Transition]
    ) -> None:
        d = self.device
        if d.connection == new:
            return
        transitions.append(
            self._transition(TransitionKind.CONNECTION, d.connection, new, cause, at)
        )
        d.connection = new
        d.connection_changed_at = at

    def _transition(
        self, kind: str, old: str, new: str, cause: str, at: datetime, relay: int | None = None
    ) -> Transition:
        self.hard = self.visible_change = True
        return Transition(
            owner_id=self.device.owner_id,
            device_id=self.device.pk,
            kind=kind,
            relay=relay,
            old=old,
            new=new,
            cause=cause[:32],
            at=at,
        )


def _quarantine_row(msg: InboundMessage, reason: str, detail: str) -> QuarantinedMessage:
    return QuarantinedMessage(
        received_at=msg.received_at,
        topic=msg.topic[:255],
        reason=reason,
        detail=detail[:255],
        payload=bytes(msg.payload[: QuarantinedMessage.PAYLOAD_KEPT]),
        size=len(msg.payload),
    )


def quarantine_unstorable(msg: InboundMessage, exc: Exception) -> None:
    """Last resort for a message the database refused although it parsed: keep it, with why."""
    QuarantinedMessage.objects.bulk_create(
        [_quarantine_row(msg, INVALID, f"could not be stored: {type(exc).__name__}")]
    )


def _telemetry_event(row: Telemetry, device: Device, parsed: Parsed) -> DeviceEvent:
    data = row.data
    if parsed.power:
        # Status events carry the normalized relay states, whatever the profile's wire format.
        data = {**data, "power": parsed.power}
    if parsed.request_id and row.kind == "status":
        data = {**data, "requestId": parsed.request_id}
    return DeviceEvent(
        event_id=f"tel_{row.pk}",
        type=row.kind,
        owner_id=row.owner_id,
        device_pk=device.pk,
        device_id=device.device_id,
        device_name=device.name,
        profile=device.profile,
        ts=row.ts,
        received_at=row.received_at,
        data=data,
        seq=row.seq,
    )


def _transition_event(t: Transition, device: Device) -> DeviceEvent:
    data: dict[str, Any] = {"old": t.old, "new": t.new, "cause": t.cause}
    if t.relay is not None:
        data["relay"] = t.relay
    return DeviceEvent(
        event_id=f"trn_{t.pk}",
        type=CONNECTION if t.kind == TransitionKind.CONNECTION else POWER,
        owner_id=t.owner_id,
        device_pk=device.pk,
        device_id=device.device_id,
        device_name=device.name,
        profile=device.profile,
        ts=t.at,
        received_at=t.at,
        data=data,
    )


def mark_silent_devices_offline(now: datetime | None = None) -> int:
    """The inactivity timeout: online devices silent for too long become offline.

    Each device is switched with a conditional UPDATE, so concurrent sweepers (several
    listener copies) record one transition per change.
    """
    from django.utils import timezone

    now = now or timezone.now()
    factor = settings.DEVICE_OFFLINE_FACTOR
    candidates = Device.objects.filter(
        connection=Connection.ONLINE, last_seen_at__isnull=False
    ).values_list("pk", "owner_id", "last_seen_at", "expected_interval")
    switched = 0
    for pk, owner_id, last_seen, interval in candidates:
        cutoff = now - timedelta(seconds=interval * factor)
        if last_seen > cutoff:
            continue
        with transaction.atomic():
            updated = Device.objects.filter(
                pk=pk, connection=Connection.ONLINE, last_seen_at__lte=cutoff
            ).update(connection=Connection.OFFLINE, connection_changed_at=now)
            if updated:
                t = Transition.objects.create(
                    owner_id=owner_id,
                    device_id=pk,
                    kind=TransitionKind.CONNECTION,
                    old=Connection.ONLINE,
                    new=Connection.OFFLINE,
                    cause="timeout",
                    at=now,
                )
                device = Device.objects.get(pk=pk)
                events = [_transition_event(t, device)]
                write_outbox(events)
                commands.after_ingest(events)
                switched += 1
    return switched
