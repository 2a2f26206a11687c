"""The delivery outbox: deliveries written in the same transaction as the events they carry.

The listener calls `write_outbox(events)` inside its batch transaction (`apps.devices.ingest`),
so an event is never stored without its deliveries, nor delivered without being stored. This is
on the ingest hot path, hence:

- the enabled destinations of an owner are cached for ROUTE_TTL seconds (one query per batch
  for owners not cached, none otherwise), so an owner without destinations costs a dict lookup;
- rows are inserted in bulk (on PostgreSQL one statement of arrays per batch);
- one Celery task per batch at most, after commit, and usually fewer: kicks are coalesced to
  one per second (a running delivery worker finds new rows by itself; see `pipeline.py`).

Changes to destinations reach a running listener within ROUTE_TTL seconds.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from django.db import connection, transaction
from django.utils import timezone

from apps.core.pg import binary_cursor
from apps.devices.events import DeviceEvent

from .kinds import KINDS
from .models import Delivery, Destination, Status, dumps_json

log = logging.getLogger(__name__)

ROUTE_TTL = 5.0


@dataclass(frozen=True, slots=True)
class Route:
    """An enabled destination and its filters, as the outbox needs them."""

    destination_id: int
    event_types: frozenset[str] | None  # None: every type
    device_pks: frozenset[int] | None  # None: every device
    pack: int = 0  # a batch kind's batch size: events per row at most; 0: one row per event

    def matches(self, event: DeviceEvent) -> bool:
        return (self.event_types is None or event.type in self.event_types) and (
            self.device_pks is None or event.device_pk in self.device_pks
        )


_routes: dict[int, tuple[float, tuple[Route, ...]]] = {}


def forget_routes() -> None:
    """Drop the cache (tests, and this process's own changes to destinations)."""
    _routes.clear()


def routes_for(owner_ids: Collection[int]) -> dict[int, tuple[Route, ...]]:
    now = time.monotonic()
    stale = [o for o in owner_ids if (entry := _routes.get(o)) is None or entry[0] < now]
    if stale:
        found: dict[int, list[Route]] = {o: [] for o in stale}
        destinations = list(
            Destination.objects.filter(owner_id__in=stale, enabled=True).values_list(
                "id", "owner_id", "event_types", "kind", "rate_limit"
            )
        )
        devices: dict[int, set[int]] = {}
        packs: dict[int, int] = {}
        if destinations:
            through = Destination.devices.through
            for destination_id, device_pk in through.objects.filter(
                destination_id__in=[d[0] for d in destinations]
            ).values_list("destination_id", "device_id"):
                devices.setdefault(destination_id, set()).add(device_pk)
            for key in {d[3] for d in destinations}:
                kind = KINDS.get(key)
                if kind is not None and kind.packs:
                    ids = [d[0] for d in destinations if d[3] == key]
                    packs.update(
                        kind.model.objects.filter(pk__in=ids).values_list("pk", "batch_size")
                    )
        for destination_id, owner_id, event_types, _kind, rate_limit in destinations:
            pks = devices.get(destination_id)
            pack = packs.get(destination_id, 0)
            if pack and rate_limit:
                # A pack is written whole: never more than one second of the destination's limit.
                pack = min(pack, rate_limit)
            found[owner_id].append(
                Route(
                    destination_id,
                    frozenset(event_types) if event_types else None,
                    frozenset(pks) if pks else None,
                    pack,
                )
            )
        expires = now + ROUTE_TTL
        for owner_id, routes in found.items():
            _routes[owner_id] = (expires, tuple(routes))
    return {o: _routes[o][1] for o in owner_ids}


def message_id(destination_id: int, event_id: str) -> str:
    """The webhook-id of an event for a destination: stable across retries and replays, and
    the same if the outbox ever sees the event twice; opaque to the receiver."""
    digest = hashlib.sha256(f"{destination_id}:{event_id}".encode()).digest()[:18]
    return "msg_" + base64.urlsafe_b64encode(digest).decode()


class _Row(NamedTuple):
    owner_id: int
    destination_id: int
    event_id: str
    event_type: str
    device: str
    message_id: str
    payload: dict | list
    events: int = 1


def write_outbox(events: Sequence[DeviceEvent]) -> int:
    """Write the deliveries of every matching enabled destination, in the caller's transaction.

    One row per event and destination, except for batch kinds (databases): one row per
    destination carrying all of this batch's events for it, or several of at most the
    destination's batch size. A database destination then costs the outbox a row per batch,
    not per event: the insert, the claim's lock and the update to `delivered` were most of what
    delivery cost the platform's PostgreSQL per event. Events the owner's database refuses are
    split out into rows of their own (dead letters), see `database/transport.py`.

    Returns the number of events written (a pack counts its events).
    """
    if not events:
        return 0
    routes = routes_for({event.owner_id for event in events})
    now = timezone.now()
    rows: list[_Row] = []
    packed: dict[Route, list[tuple[DeviceEvent, dict]]] = {}
    for event in events:
        payload = None
        for route in routes.get(event.owner_id, ()):
            if not route.matches(event):
                continue
            if payload is None:
                payload = event.as_payload()
            if route.pack:
                packed.setdefault(route, []).append((event, payload))
                continue
            rows.append(
                _Row(
                    event.owner_id,
                    route.destination_id,
                    event.event_id,
                    event.type,
                    event.device_id,
                    message_id(route.destination_id, event.event_id),
                    payload,
                )
            )
    for route, members in packed.items():
        for start in range(0, len(members), route.pack):
            rows.append(_pack(route.destination_id, members[start : start + route.pack]))
    if not rows:
        return 0
    if connection.vendor == "postgresql":
        _insert_postgres(rows, now)
    else:
        Delivery.objects.bulk_create(
            [Delivery(**row._asdict(), created_at=now, next_attempt_at=now) for row in rows],
            batch_size=500,
        )
    transaction.on_commit(_kick_after_commit, robust=True)
    return sum(row.events for row in rows)


def pack_event_id(first: str, count: int) -> str:
    """A pack's event id: its first event's, and how many follow ("tel_812+499"). Unique per
    destination (an event is in one pack per destination). A pack of several never takes an
    event's own id, which an event split out of it takes; a pack of one is never split."""
    return first if count == 1 else f"{first}+{count - 1}"


def _pack(destination_id: int, members: list[tuple[DeviceEvent, dict]]) -> _Row:
    first = members[0][0]
    types = {event.type for event, _ in members}
    devices = {event.device_id for event, _ in members}
    event_id = pack_event_id(first.event_id, len(members))
    return _Row(
        first.owner_id,
        destination_id,
        event_id,
        first.type if len(types) == 1 else "batch",
        first.device_id if len(devices) == 1 else "",
        message_id(destination_id, event_id),
        [payload for _, payload in members],
        len(members),
    )


# One statement of constant text whatever the batch: the columns as arrays, bound on the server
# in binary (`%b`: psycopg's text array format escapes every element with a regex), unnested by
# PostgreSQL. Django's bulk_create built a model instance per row and
# quoted ~7,000 parameters per 500 rows in Python — the larger part of ingest's cost for an
# owner with destinations. No `ON CONFLICT`: event ids are new in this batch (see the
# constraint's note on `Delivery`).
_INSERT = f"""
    INSERT INTO {Delivery._meta.db_table}
        (owner_id, destination_id, event_id, event_type, device, message_id, payload, events,
         created_at, next_attempt_at, status, attempts, last_error, replays)
    SELECT o, d, e, t, dv, m, p, n, %(now)b, %(now)b, %(status)b, 0, '', 0
    FROM unnest(%(o)b::bigint[], %(d)b::bigint[], %(e)b::text[], %(t)b::text[],
                %(dv)b::text[], %(m)b::text[], %(p)b::text[], %(n)b::bigint[])
         AS u(o, d, e, t, dv, m, p, n)
"""  # noqa: S608 - table name from model meta, values bound


def _insert_postgres(rows: list[_Row], now: datetime) -> None:
    columns = list(zip(*rows, strict=True))
    with binary_cursor(connection, binary_results=True) as cursor:
        cursor.execute(
            _INSERT,
            {
                "now": now,
                "status": str(Status.PENDING),
                "o": list(columns[0]),
                "d": list(columns[1]),
                "e": list(columns[2]),
                "t": list(columns[3]),
                "dv": list(columns[4]),
                "m": list(columns[5]),
                "p": [dumps_json(p) for p in columns[6]],
                "n": list(columns[7]),
            },
        )


def _kick_after_commit() -> None:
    from .tasks import kick  # the listener imports this module early; Celery only when needed

    kick()
