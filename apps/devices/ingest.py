"""Turning a batch of raw MQTT messages into stored telemetry, device state and transitions.

`ingest_batch` is the listener's per-batch function, callable (and tested) without a broker:
one transaction per batch writes telemetry rows, quarantine rows, device state, transition rows
and, through the hooks, delivery outbox rows and command confirmations. Devices touched by the
batch are locked and read fresh (`SELECT … FOR UPDATE`), so several listener copies behind a
shared subscription agree on state changes and on meter sequence numbers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from django.conf import settings
from django.db import connection, transaction

from apps.core.pg import binary_cursor
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

# Read fresh for every batch: what other processes change too (the sweeper, other listener
# copies, commands). Readings, signal and uptime only the listener writes: the cached instance
# has the latest, and parsing their JSON per batch would cost more than everything else.
LOAD_FIELDS = [
    f for f in STATE_FIELDS if f not in ("last_reading", "last_reading_at", "rssi", "uptime")
]


@dataclass(slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    received_at: datetime
    qos: int = 0
    mid: int = 0
    retained: bool = False
    # `prepare(self)`, when done ahead of the batch (by the listener's network thread).
    prepared: Prepared | None = None


# (profile name and device key the topic names, or None; profile name; what parsing gave;
# the reason it was refused, or None)
Prepared = tuple[tuple[str, str] | None, str, Parsed | None, Reject | None]


def prepare(msg: InboundMessage, limit: int | None = None) -> Prepared:
    """Route and parse one message: no database, so it can be done outside the batch.

    `limit`: settings.MQTT_MAX_PAYLOAD, read once by a caller preparing many messages.
    """
    where: tuple[str, str] | None = None
    if limit is None:
        limit = settings.MQTT_MAX_PAYLOAD
    try:
        profile, key, channel = route(msg.topic)
        where = (profile.name, key)
        if len(msg.payload) > limit:
            raise Reject(OVERSIZE, f"{len(msg.payload)} bytes > {limit}")
        return where, profile.name, profile.parse(key, channel, msg.payload), None
    except Reject as exc:
        if len(msg.payload) > limit and exc.reason != OVERSIZE:
            exc = Reject(OVERSIZE, f"{len(msg.payload)} bytes > {limit}")
        return where, "", None, exc


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
    INSTANCE_TTL = 30.0  # names and settings of a device reach the live pages this late

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[_DeviceRef, float]] = {}
        self._unknown: dict[tuple[str, str], float] = {}
        self._trackers: dict[int, SeqTracker] = {}
        self._instances: dict[int, tuple[Device, float]] = {}

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

    def load(self, pks: set[int], *, lock: bool = False) -> dict[int, Device]:
        """Devices with their state read now (locked, in key order, if asked).

        Only the state columns are read per batch; the rest of a device (name, profile…) comes
        from instances cached for INSTANCE_TTL: building a full model instance per message
        would cost more than the rest of the batch.
        """
        if connection.vendor == "postgresql":
            fresh = _load_state_pg(pks, lock)
        else:
            qs = Device.objects.filter(pk__in=pks)
            if lock:
                qs = qs.select_for_update().order_by("pk")
            fresh = {row[0]: row[1:] for row in qs.values_list("pk", *LOAD_FIELDS)}
        now = time.monotonic()
        stale = [
            pk for pk in fresh if now - self._instances.get(pk, (None, -1e9))[1] > self.INSTANCE_TTL
        ]
        if stale:
            for device in Device.objects.filter(pk__in=stale):
                self._instances[device.pk] = (device, now)
        out: dict[int, Device] = {}
        for pk, values in fresh.items():
            device = self._instances[pk][0]
            # The fields' values live in the instance's __dict__ (Django's field descriptors
            # only read it): one update instead of a setattr per field and device.
            device.__dict__.update(zip(LOAD_FIELDS, values, strict=True))
            out[pk] = device
        return out

    def tracker(self, device: Device) -> SeqTracker:
        tracker = self._trackers.get(device.id)
        if tracker is None:
            tracker = self._trackers[device.id] = SeqTracker(device.boot_id, device.last_seq)
        return tracker

    def forget(self, profile: str, key: str) -> None:
        self._known.pop((profile, key), None)


_directory = DeviceDirectory()


def _load_state_pg(pks: set[int], lock: bool) -> dict[int, tuple]:
    """The LOAD_FIELDS of these devices, as `values_list` would give them, several times faster.

    Django's queryset binds the ids client-side (one placeholder each, quoted in Python) and
    loads timestamps and JSON through Python converters: with a few hundred devices per batch
    that was a third of the batch's CPU. Here: one array parameter bound server-side in binary,
    psycopg's C timestamp loader, orjson for the JSON column.
    """
    meta = Device._meta
    qn = connection.ops.quote_name
    pk = qn(meta.pk.column)
    columns = ", ".join(qn(meta.get_field(name).column) for name in LOAD_FIELDS)
    sql = f"SELECT {pk}, {columns} FROM {qn(meta.db_table)} WHERE {pk} = ANY(%b)"  # noqa: S608
    if lock:
        sql += f" ORDER BY {pk} FOR UPDATE"
    with binary_cursor(connection) as cursor:
        cursor.adapters.register_loader("timestamptz", _timestamptz_loader())
        cursor.execute(sql, (sorted(pks),))
        rows = cursor.fetchall()
    fresh = {}
    for row in rows:
        values = list(row[1:])
        for i in _JSON_COLUMNS:
            if isinstance(values[i], str | bytes):
                values[i] = orjson.loads(values[i])
        fresh[row[0]] = tuple(values)
    return fresh


@functools.cache
def _timestamptz_loader() -> type:
    """psycopg's own (C) loader; Django registers a Python subclass on its connections."""
    import psycopg

    return psycopg.adapters.get_loader(
        psycopg.postgres.types["timestamptz"].oid, psycopg.pq.Format.TEXT
    )


_JSON_COLUMNS = [
    i
    for i, name in enumerate(LOAD_FIELDS)
    if Device._meta.get_field(name).get_internal_type() == "JSONField"
]


def ingest_batch(
    messages: Sequence[InboundMessage], directory: DeviceDirectory | None = None
) -> BatchResult:
    directory = directory or _directory
    result = BatchResult()
    quarantine: list[QuarantinedMessage] = []
    accepted: list[tuple[InboundMessage, str, Parsed]] = []

    # Refused messages whose topic names a device: shown to that device's owner.
    attributable: list[tuple[QuarantinedMessage, tuple[str, str]]] = []
    limit = settings.MQTT_MAX_PAYLOAD
    for msg in messages:
        where, profile_name, parsed, exc = msg.prepared or prepare(msg, limit)
        if exc is None:
            accepted.append((msg, profile_name, parsed))
        else:
            row = _quarantine_row(msg, exc.reason, exc.detail)
            quarantine.append(row)
            if where:
                attributable.append((row, where))

    keys = {(profile, parsed.key) for _, profile, parsed in accepted}
    refs = directory.resolve(keys | {where for _, where in attributable})
    with transaction.atomic():
        devices = directory.load({ref.pk for ref in refs.values()})
        gone = {key for key, ref in refs.items() if ref.pk not in devices}
        if gone:
            # Deleted since they were cached, and perhaps created again under the same topic
            # (a device replaced in the admin): look them up afresh rather than quarantine
            # the new device's messages.
            for key in gone:
                directory.forget(*key)
                del refs[key]
            again = directory.resolve(gone)
            refs.update(again)
            devices.update(directory.load({ref.pk for ref in again.values()}))
        # Lock, and read again, only the devices whose connection, power or identity this batch
        # may change (in key order, so listener copies never deadlock): transitions are then
        # recorded once even when several copies share the stream. Readings need no lock.
        lock = _state_changes(accepted, refs, devices)
        if lock:
            devices.update(directory.load(lock, lock=True))
        state = {pk: _DeviceState(d, directory.tracker(d)) for pk, d in devices.items()}
        for row, where in attributable:
            ref = refs.get(where)
            if ref and ref.pk in devices:  # only devices that still exist
                row.owner_id, row.device_id = ref.owner_id, ref.pk
        telemetry: list[tuple[_Row, _DeviceState, Parsed]] = []
        transitions: list[Transition] = []

        for msg, profile, parsed in accepted:
            ref = refs.get((profile, parsed.key))
            st = state.get(ref.pk) if ref else None
            if st is None:
                if ref:
                    directory.forget(profile, parsed.key)  # deleted meanwhile: look again
                quarantine.append(
                    _quarantine_row(msg, UNKNOWN_DEVICE, f"no {profile} device {parsed.key!r}")
                )
                continue
            row = st.apply(msg, parsed, transitions)
            if row is None:
                result.ignored += 1
                continue
            telemetry.append((row, st, parsed))

        stored = _insert_telemetry([t[0] for t in telemetry])
        for row, st, _ in telemetry:
            if row.pk is None:  # the database already has this (device, boot, seq)
                st.duplicate()
                result.duplicates += 1
        telemetry = [t for t in telemetry if t[0].pk is not None]
        Transition.objects.bulk_create(transitions, batch_size=1000)
        if quarantine:
            QuarantinedMessage.objects.bulk_create(quarantine, batch_size=500)

        changed = [st for st in state.values() if st.needs_write()]
        if changed:
            _write_state(changed)

        events = [_telemetry_event(row, st.device, parsed) for row, st, parsed in telemetry]
        events += [_transition_event(t, devices[t.device_id]) for t in transitions]
        if events:
            write_outbox(events)
            commands.after_ingest(events)
    for st in changed:
        st.written()

    result.stored = stored
    result.quarantined = len(quarantine)
    result.events = events
    result.changed_devices = [st.device for st in changed if st.visible_change]
    return result


def _state_changes(
    accepted: list[tuple[InboundMessage, str, Parsed]],
    refs: dict[tuple[str, str], _DeviceRef],
    devices: dict[int, Device],
) -> set[int]:
    """Devices whose connection, power, boot or identity some message of the batch changes."""
    pks: set[int] = set()
    for _, profile, p in accepted:
        ref = refs.get((profile, p.key))
        d = devices.get(ref.pk) if ref else None
        if d is None or d.id in pks:
            continue
        if (
            (p.connection and p.connection != d.connection)
            or (p.power and any(d.power.get(r) != v for r, v in p.power.items()))
            or (p.boot_id and p.boot_id != d.boot_id)
            or (p.topic_order and p.topic_order != d.topic_order)
            or (p.firmware is not None and p.firmware != d.firmware)
            or (p.device_type is not None and p.device_type != d.device_type)
            or (p.ip is not None and p.ip != d.ip_address)
        ):
            pks.add(d.id)
    return pks


@dataclass(slots=True)
class _Row:
    """A telemetry row to insert (a model instance per message costs more than the insert)."""

    owner_id: int
    device_id: int
    kind: str
    ts: datetime
    received_at: datetime
    seq: int | None
    boot: str
    topic: str
    data: dict[str, Any]
    pk: int | None = None


def _insert_telemetry(rows: list[_Row]) -> int:
    """INSERT … ON CONFLICT DO NOTHING RETURNING; sets the pk of each stored row.

    A (device, boot, seq) the table already holds is skipped by the database, which makes a
    redelivered meter message a no-op whichever listener copy receives it.

    PostgreSQL: one statement for the whole batch, its nine columns bound as arrays in binary
    (`unnest`): psycopg adapts them in C, the query text stays short whatever the batch size,
    and it is one round trip (a COPY into a scratch table and an INSERT … SELECT from it took
    three to five, more client CPU, and a truncation of the scratch table at every commit; the
    batch as one JSON document unpacked by `jsonb_array_elements` saved the listener ~5 us per
    row in isolation, but cost its PostgreSQL backend 5-10 us more in bench-dbsink).
    Rows come back in insertion order (as Django's bulk_create also relies on); sequenced rows
    are matched by their key, the others by that order. SQLite runs in-process, where a loop of
    one cached statement is just as fast and needs no matching.
    """
    if not rows:
        return 0
    meta = Telemetry._meta
    names = ["owner", "device", "kind", "ts", "received_at", "seq", "boot", "topic", "data"]
    qn = connection.ops.quote_name
    table = qn(meta.db_table)
    columns = ", ".join(qn(meta.get_field(n).column) for n in names)
    payloads = [orjson.dumps(r.data).decode() for r in rows]
    if connection.vendor == "postgresql":
        types = ["int8", "int8", "text", "timestamptz", "timestamptz", "int8", "text", "text",
                 "jsonb"]  # fmt: skip
        arrays = ", ".join(f"%b::{t}[]" for t in types)  # binary: adapted in C, not quoted
        fields = ", ".join(f"f{i}" for i in range(len(names)))
        with binary_cursor(connection) as cursor:
            # Identifiers come from the model's meta (quoted); every value is bound.
            cursor.execute(
                f"INSERT INTO {table} ({columns}) SELECT {fields} "  # noqa: S608
                f"FROM unnest({arrays}) WITH ORDINALITY AS v({fields}, n) ORDER BY n "
                f"ON CONFLICT DO NOTHING RETURNING {qn('id')}, {qn('device_id')}, "
                f"{qn('boot')}, {qn('seq')}",
                [
                    [r.owner_id for r in rows],
                    [r.device_id for r in rows],
                    [r.kind for r in rows],
                    [r.ts for r in rows],
                    [r.received_at for r in rows],
                    [r.seq for r in rows],
                    [r.boot for r in rows],
                    [r.topic for r in rows],
                    payloads,
                ],
            )
            returned = cursor.fetchall()
            by_key = {(d, b, q): pk for pk, d, b, q in returned if q is not None}
            unsequenced = iter([pk for pk, _, _, q in returned if q is None])
            for row in rows:
                if row.seq is None:
                    row.pk = next(unsequenced)
                else:  # pop: a key twice in one batch was stored once, for its first row
                    row.pk = by_key.pop((row.device_id, row.boot, row.seq), None)
    else:
        with connection.cursor() as cursor:
            sql = (
                f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(names))}) "  # noqa: S608
                f"ON CONFLICT DO NOTHING RETURNING {qn('id')}"
            )
            for row, payload in zip(rows, payloads, strict=True):
                cursor.execute(
                    sql,
                    (
                        row.owner_id,
                        row.device_id,
                        row.kind,
                        row.ts,
                        row.received_at,
                        row.seq,
                        row.boot,
                        row.topic,
                        payload,
                    ),
                )
                found = cursor.fetchone()
                row.pk = found[0] if found else None
    return sum(1 for r in rows if r.pk is not None)


# Absolute state written from the batch's view of the device; counters are added, so that
# listener copies writing the same device never undo each other's counts.
COUNTERS = ["seq_gaps", "seq_missing", "seq_duplicates"]


def _write_state(states: list[_DeviceState]) -> None:
    """One parameterized UPDATE per device, sent as one executemany, in key order.

    `bulk_update` builds a CASE expression per field and row and costs milliseconds per device.
    On PostgreSQL the statement is bound server-side (prepared once, values adapted in C, the
    JSON columns by orjson) and pipelined; Django's cursor would quote every value of every row
    in Python. Key order: listener copies updating the same devices never deadlock.
    """
    fields = [Device._meta.get_field(name) for name in STATE_FIELDS if name not in COUNTERS]
    qn = connection.ops.quote_name
    assignments = [f"{qn(f.column)} = %s" for f in fields]
    assignments += [f"{qn(c)} = {qn(c)} + %s" for c in COUNTERS]
    table = qn(Device._meta.db_table)
    sql = f"UPDATE {table} SET {', '.join(assignments)} WHERE {qn('id')} = %s"  # noqa: S608
    states = sorted(states, key=lambda st: st.device.pk)
    if connection.vendor == "postgresql":
        from psycopg.types.json import Jsonb

        json_fields = {f.attname for f in fields if f.get_internal_type() == "JSONField"}
        names = [f.attname for f in fields]
        params = [
            [
                Jsonb(getattr(st.device, n), dumps=_json_text)
                if n in json_fields
                else getattr(st.device, n)
                for n in names
            ]
            + [st.tracker.pending[c] for c in COUNTERS]
            + [st.device.pk]
            for st in states
        ]
        with binary_cursor(connection) as cursor:
            cursor.executemany(sql, params)
        return
    params = [
        [f.get_db_prep_save(getattr(st.device, f.attname), connection) for f in fields]
        + [st.tracker.pending[c] for c in COUNTERS]
        + [st.device.pk]
        for st in states
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(slots=True)
class SeqTracker:
    """This process's view of one meter's sequence, between writes of the device row."""

    boot: str = ""
    last_seq: int | None = None
    pending: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))


class _DeviceState:
    """A device row and what this batch does to it."""

    def __init__(self, device: Device, tracker: SeqTracker) -> None:
        self.device = device
        self.tracker = tracker
        self.hard = False  # something that must be written now changed
        self.soft = False  # only liveness/reading changed
        self.visible_change = False  # worth pushing to live pages
        self._last_written_seen = device.last_seen_at
        if tracker.boot != device.boot_id:  # the row knows better (another copy, a restart)
            tracker.boot, tracker.last_seq = device.boot_id, device.last_seq

    def needs_write(self) -> bool:
        if self.hard:
            return True
        if not self.soft:
            return False
        last = self._last_written_seen
        return last is None or self.device.last_seen_at - last >= SOFT_WRITE_INTERVAL

    def written(self) -> None:
        self.tracker.pending = dict.fromkeys(COUNTERS, 0)

    def duplicate(self) -> None:
        self.tracker.pending["seq_duplicates"] += 1
        self.device.seq_duplicates += 1
        self.soft = True

    def apply(self, msg: InboundMessage, p: Parsed, transitions: list[Transition]) -> _Row | None:
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
        if p.seq is not None or p.boot_id:
            self._track_seq(p)

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
        return _Row(
            owner_id=d.owner_id,
            device_id=d.id,
            kind=p.kind,
            ts=p.ts or at,
            received_at=at,
            seq=p.seq,
            boot=d.boot_id if p.seq is not None else "",
            topic=msg.topic[:255],
            data=p.data,
        )

    def _track_seq(self, p: Parsed) -> None:
        """meter-v2: a new boot id restarts the sequence; gaps are counted.

        Duplicates are not decided here but by the table's (device, boot, seq) uniqueness.
        The gap count is this process's view: exact with one listener, an estimate when
        several copies share a device's messages.
        """
        d, t = self.device, self.tracker
        if p.boot_id and p.boot_id != d.boot_id:
            d.boot_id = t.boot = p.boot_id
            d.last_seq = t.last_seq = p.seq
            self.hard = self.visible_change = True
            return
        if p.seq is None:
            return
        if t.last_seq is not None and p.seq > t.last_seq + 1:
            t.pending["seq_gaps"] += 1
            t.pending["seq_missing"] += p.seq - t.last_seq - 1
            d.seq_gaps += 1
            d.seq_missing += p.seq - t.last_seq - 1
        if t.last_seq is None or p.seq > t.last_seq:
            t.last_seq = d.last_seq = p.seq
            self.soft = True

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
            device_id=self.device.id,
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


def _telemetry_event(row: _Row, device: Device, parsed: Parsed) -> DeviceEvent:
    data = row.data if parsed.event_data is None else parsed.event_data
    if parsed.power:
        # Status events carry the normalized relay states, whatever the profile's wire format.
        data = {**data, "power": parsed.power}
    if parsed.request_id and row.kind == "status":
        data = {**data, "requestId": parsed.request_id}
    return DeviceEvent(
        event_id=f"tel_{row.pk}",
        type=row.kind,
        owner_id=row.owner_id,
        device_pk=device.id,
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


def mark_silent_devices_offline(now: datetime | None = None) -> BatchResult:
    """The inactivity timeout: online devices silent for too long become offline.

    Each device is switched with a conditional UPDATE, so concurrent sweepers (several
    listener copies) record one transition per change. The result carries the switched
    devices and their events for the live pages, like a batch's.
    """
    from django.utils import timezone

    now = now or timezone.now()
    factor = settings.DEVICE_OFFLINE_FACTOR
    # last_seen_at is written lazily (SOFT_WRITE_INTERVAL): never time out faster than that.
    floor = 2 * SOFT_WRITE_INTERVAL.total_seconds()
    candidates = Device.objects.filter(
        connection=Connection.ONLINE, last_seen_at__isnull=False
    ).values_list("pk", "last_seen_at", "expected_interval")
    result = BatchResult()
    for pk, last_seen, interval in candidates:
        cutoff = now - timedelta(seconds=max(interval * factor, floor))
        if last_seen > cutoff:
            continue
        with transaction.atomic():
            updated = Device.objects.filter(
                pk=pk, connection=Connection.ONLINE, last_seen_at__lte=cutoff
            ).update(connection=Connection.OFFLINE, connection_changed_at=now)
            if not updated:
                continue  # it spoke meanwhile, or another sweeper took it
            device = Device.objects.get(pk=pk)
            t = Transition.objects.create(
                owner_id=device.owner_id,
                device_id=pk,
                kind=TransitionKind.CONNECTION,
                old=Connection.ONLINE,
                new=Connection.OFFLINE,
                cause="timeout",
                at=now,
            )
            events = [_transition_event(t, device)]
            write_outbox(events)
            commands.after_ingest(events)
        result.changed_devices.append(device)
        result.events += events
    return result
