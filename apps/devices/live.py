"""Live status over Channels: the message shapes, and the two ways to send them.

Every message a browser receives is built here and nowhere else; the consumer
(`apps.devices.consumers`) imports the same builders for the snapshot and its replies.

Groups: `owner.<owner id>` carries device states and command results to every socket of the
owner's members; `device.<device pk>` carries the high-volume streams a device page asks for
(chart points, transitions). Every layer message is an envelope that names its owner, so the
consumer can refuse anything that is not for one of its owners (defence in depth: a wrong group
name must still not leak another owner's events).

Senders:
- `BatchPublisher`: the MQTT listener hands over each committed batch from its own thread. It
  must never wait for the channel layer, so messages are merged into a bounded buffer that a
  background asyncio thread drains; under load it coalesces more (latest state per device wins)
  and, past its bound, drops the oldest entries, counts them and tells pages to re-sync.
- `send_after_commit`: web and worker code (command results) after its transaction commits.

Watched groups: a layer message to a group nobody is in still costs the sender a round trip
(~0.1–0.2 ms of CPU with the Redis layer). The listener flushes one message per group with news
every 50 ms, so a fleet of a thousand meters cost it about a core at 8,000 events/s with no
page open at all. Sockets therefore mark the groups they are in as watched (`watch`, in Django's
cache, renewed while they stay connected), and `BatchPublisher` sends only to watched groups.
A cache that is not shared between processes (local memory, dummy) cannot say who watches:
then every group counts as watched, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer
from django.core.cache import cache, caches
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django.db import transaction
from django.utils import timezone

from . import events as ev
from .models import Device, Profile

logger = logging.getLogger(__name__)

Message = dict[str, Any]

# The consumer handler every envelope is dispatched to (`live.push` -> `live_push`).
ENVELOPE_TYPE = "live.push"
# At most this many devices in a snapshot, and chart points kept per device between flushes.
SNAPSHOT_LIMIT = 1000
MAX_POINTS = 120
MAX_TRANSITIONS = 50
MAX_SERIES = 8
# Message types that go to a device group; everything else goes to the owner group.
DEVICE_STREAM_TYPES = frozenset({"telemetry", "transition"})


def owner_group(owner_id: int) -> str:
    return f"owner.{owner_id}"


def device_group(device_pk: int) -> str:
    return f"device.{device_pk}"


# --- who is watching ----------------------------------------------------------------------------

# A socket renews its groups every WATCH_RENEW seconds; a mark lives WATCH_TTL seconds, so a
# socket that went away without a word stops costing sends within a minute.
WATCH_TTL = 60
WATCH_RENEW = 20


def _watch_key(group: str) -> str:
    return f"live:watched:{group}"


def watch_is_shared() -> bool:
    """Whether marks made by the web processes reach the listener (a cache shared by both)."""
    return not isinstance(caches["default"], LocMemCache | DummyCache)


# Changed whenever a socket marks its groups (on joining, and every WATCH_RENEW seconds): a
# publisher's answers about who watches stay valid until then. Marks that expire only cost it
# sends to nobody until it asks again (WATCH_RECHECK); a mark the cache evicted early is back
# with the socket's next renewal.
WATCH_GENERATION = "live:watched:generation"
WATCH_RECHECK = 5.0


async def awatch(groups: Iterable[str]) -> None:
    """Mark `groups` as watched for WATCH_TTL seconds (a socket is in them)."""
    marks = {_watch_key(g): 1 for g in groups}
    if marks and watch_is_shared():
        await cache.aset_many(marks, timeout=WATCH_TTL)
        # After the marks: a publisher that sees the new generation sees them too.
        await cache.aset(WATCH_GENERATION, uuid.uuid4().hex, timeout=None)


def watch(groups: Iterable[str]) -> None:
    """`awatch` from synchronous code."""
    async_to_sync(awatch)(list(groups))


def watched(groups: Iterable[str]) -> set[str]:
    """The groups of `groups` some socket is in (all of them when that cannot be known)."""
    groups = list(groups)
    if not groups or not watch_is_shared():
        return set(groups)
    keys = {_watch_key(g): g for g in groups}
    return {keys[k] for k in cache.get_many(list(keys))}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class Watchers:
    """A publisher's view of who watches: one cache read per flush while no socket has marked a
    new group, and the marks themselves asked only for groups not seen since.

    Nothing is missed: a socket writes its marks, then the generation, then joins the group, then
    takes its snapshot. A flush that reads the generation before that write sends only data
    committed before it, which the snapshot (taken after) holds; one that reads it after asks
    the marks again and finds the new one."""

    def __init__(self) -> None:
        self.known: dict[str, bool] = {}
        self.generation: Any = None
        self.asked_at = -math.inf

    def filter(self, groups: Collection[str]) -> set[str]:
        if not watch_is_shared():
            return set(groups)
        now = time.monotonic()
        generation = cache.get(WATCH_GENERATION)
        if generation != self.generation or now - self.asked_at > WATCH_RECHECK:
            self.known.clear()
            self.generation, self.asked_at = generation, now
        unknown = [g for g in groups if g not in self.known]
        if unknown:
            found = watched(unknown)
            for g in unknown:
                self.known[g] = g in found
        return {g for g in groups if self.known[g]}


# --- message shapes ---------------------------------------------------------------------------


def device_state(device: Device) -> Message:
    """The one JSON shape of a device tile; used by the snapshot and by `device` deltas.

    Reads only the device's own columns (no related rows), so the listener can call it for
    every changed device of a batch without extra queries.
    """
    return {
        "id": device.pk,
        "device_id": device.device_id,
        "name": device.name or device.device_id,
        "location": device.location,
        "profile": device.profile,
        "profile_label": device.get_profile_display(),
        "owner_id": device.owner_id,
        "connection": device.connection,
        "connection_changed_at": _iso(device.connection_changed_at),
        # Meters have no relay to show or switch.
        "relays": device.relays() if device.profile != Profile.METER_V2 else [],
        "power": {str(k): v for k, v in (device.power or {}).items()},
        "last_reading": device.last_reading or {},
        "last_reading_at": _iso(device.last_reading_at),
        "last_seen_at": _iso(device.last_seen_at),
        "firmware": device.firmware,
        "device_type": device.device_type,
        "ip": device.ip_address,
        "rssi": device.rssi,
        "uptime": device.uptime,
        "seq_gaps": device.seq_gaps,
    }


def snapshot_message(devices: Iterable[Device], *, truncated: bool = False) -> Message:
    return {
        "type": "snapshot",
        "server_time": timezone.now().isoformat(),
        "devices": [device_state(d) for d in devices],
        "truncated": truncated,
    }


def devices_message(states: Sequence[Message]) -> Message:
    return {"type": "device", "devices": list(states)}


def telemetry_message(device_id: str, points: Sequence[Message]) -> Message:
    return {"type": "telemetry", "device": device_id, "points": list(points)}


def transition_message(device_id: str, transitions: Sequence[Message]) -> Message:
    return {"type": "transition", "device": device_id, "transitions": list(transitions)}


def command_message(
    *,
    device_id: str,
    command_id: str,
    action: str,
    status: str,
    relay: int | None = None,
    detail: str = "",
) -> Message:
    """A command's progress (`published`, `confirmed`, `expired`, `failed`) for its buttons."""
    return {
        "type": "command",
        "device": device_id,
        "command_id": command_id,
        "action": action,
        "relay": relay,
        "status": status,
        "detail": detail,
    }


def resync_message() -> Message:
    """Tells pages that deltas were lost (publisher overload): fetch a fresh snapshot."""
    return {"type": "resync"}


def error_message(error: str, detail: str = "", **extra: Any) -> Message:
    return {"type": "error", "error": error, "detail": detail, **extra}


def chart_values(data: Mapping[str, Any]) -> dict[str, float]:
    """The numeric readings of a telemetry payload, as chart series.

    Meters send `{"voltage", "current", "power", "energy", ...}`; Tasmota nests them in
    `{"ENERGY": {"Voltage", "Total", ...}}`. One level of nesting is flattened, names are
    lowercased and Tasmota's `total` is the meter's `energy`. Booleans, NaN and infinities are
    not readings.
    """
    values: dict[str, float] = {}

    def take(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if not math.isfinite(value) or len(values) >= MAX_SERIES:
            return
        name = key.lower()
        values.setdefault("energy" if name == "total" else name, float(value))

    for key, value in data.items():
        if key in ("v", "seq"):  # a stored meter-v2 message's envelope, not a reading
            continue
        if isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                take(str(sub_key), sub_value)
        else:
            take(str(key), value)
    return values


def chart_point(ts: datetime, data: Mapping[str, Any]) -> Message | None:
    values = chart_values(data)
    return {"ts": ts.isoformat(), "values": values} if values else None


def transition_entry(event: ev.DeviceEvent) -> Message:
    data = event.data
    return {
        "kind": event.type,
        "relay": data.get("relay"),
        "old": data.get("old", ""),
        "new": data.get("new", ""),
        "cause": data.get("cause", ""),
        "at": event.ts.isoformat(),
    }


def envelope(owner_id: int, payloads: Sequence[Message]) -> Message:
    """The channel-layer message: the owner it belongs to and the browser messages it carries."""
    return {"type": ENVELOPE_TYPE, "owner_id": owner_id, "payloads": list(payloads)}


# --- sending from web and worker code ---------------------------------------------------------


def group_for(owner_id: int, device_pk: int | None, message: Message) -> str:
    if message.get("type") in DEVICE_STREAM_TYPES:
        if device_pk is None:
            raise ValueError(f"a {message['type']!r} message needs the device it belongs to")
        return device_group(device_pk)
    return owner_group(owner_id)


def send_after_commit(
    owner_id: int, device_pk: int | None, message: Message, *, using: str | None = None
) -> None:
    """Push `message` to the pages of `owner_id` once the current transaction commits.

    Device state and command messages go to the owner group (every dashboard and device page
    of the owner's members); chart streams (`telemetry`, `transition`) to the device's group.
    Call it from synchronous code only (views, actions, Celery tasks). A failed push is logged,
    never raised: the database is the truth and pages re-sync from it on reconnect.
    """
    group = group_for(owner_id, device_pk, message)
    payload = envelope(owner_id, [message])
    transaction.on_commit(lambda: _send_now(group, payload), using=using)


def _send_now(group: str, payload: Message) -> None:
    try:
        async_to_sync(get_channel_layer().group_send)(group, payload)
    except Exception:
        logger.exception("live push to %s failed", group)


# --- the listener's publisher -----------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """What is waiting to be sent to one group; merged across batches until the next flush.

    Device states are built when published (the listener's device objects change with the next
    batch). A device's events are kept as they are and turned into chart points and transition
    entries only when sent, so a group nobody watches costs a list append per event."""

    owner_id: int
    device_id: str = ""
    states: dict[int, Message] | None = None
    points: list[ev.DeviceEvent] | None = None  # telemetry events, oldest first
    transitions: list[ev.DeviceEvent] | None = None
    resync: bool = False

    def size(self) -> int:
        return len(self.states or ()) + len(self.points or ()) + len(self.transitions or ())

    def payloads(self) -> tuple[list[Message], int]:
        """The layer messages, and how many entries the caps dropped."""
        out: list[Message] = []
        dropped = 0
        if self.resync:
            out.append(resync_message())
        if self.states:
            out.append(devices_message(list(self.states.values())))
        if self.points:
            points = [p for e in self.points if (p := chart_point(e.ts, e.data))]
            dropped += max(0, len(points) - MAX_POINTS)
            if points:
                out.append(telemetry_message(self.device_id, points[-MAX_POINTS:]))
        if self.transitions:
            dropped += max(0, len(self.transitions) - MAX_TRANSITIONS)
            entries = [transition_entry(e) for e in self.transitions[-MAX_TRANSITIONS:]]
            out.append(transition_message(self.device_id, entries))
        return out, dropped


def _append_capped(entries: list[ev.DeviceEvent], event: ev.DeviceEvent, cap: int) -> int:
    """Append; past four times `cap` keep the newest `cap` (the rest would be dropped when sent
    anyway). Returns how many were dropped now."""
    entries.append(event)
    if len(entries) <= 4 * cap:
        return 0
    dropped = len(entries) - cap
    del entries[:dropped]
    return dropped


_STREAM_EVENTS = frozenset({ev.TELEMETRY, ev.CONNECTION, ev.POWER})


class BatchPublisher:
    """Hands the listener's committed batches to the channel layer without ever blocking it.

    `publish()` runs in the caller's thread: it builds the messages (no queries) and merges
    them into a buffer keyed by group. A background thread with its own asyncio loop flushes
    the buffer every `flush_interval` seconds at most, one layer message per watched group
    (`Watchers`; the others are counted in `unwatched`). When more than `max_groups` groups
    are waiting, the oldest is dropped and counted in `dropped`; if it carried device states,
    its owner's pages are told to re-sync from a snapshot.
    """

    def __init__(
        self,
        *,
        max_groups: int = 10_000,
        flush_interval: float = 0.05,
        concurrency: int = 16,
        layer_alias: str = DEFAULT_CHANNEL_LAYER,
    ) -> None:
        self.max_groups = max_groups
        self.flush_interval = flush_interval
        self.concurrency = concurrency
        self.layer_alias = layer_alias
        self.sent = 0  # layer messages sent
        self.unwatched = 0  # layer messages not sent: no socket was in their group
        self.dropped = 0  # states, points or transitions dropped because the buffer was full
        self.errors = 0  # layer messages that failed
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._resync_owners: set[int] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._idle = threading.Event()
        self._idle.set()
        self._stop_requested: asyncio.Event | None = None

    # -- caller side (the listener's thread) --

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("BatchPublisher already started")
        if not watch_is_shared():
            logger.warning(
                "live: the cache is not shared between processes (set CACHE_URL): every group "
                "is sent to, whether or not a page watches it"
            )
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="live-publisher", daemon=True
        )
        self._thread.start()
        ready.wait()

    def publish(self, devices: Sequence[Device], events: Sequence[ev.DeviceEvent]) -> None:
        """Queue a committed batch: changed devices (fresh rows) and the batch's events."""
        loop = self._loop
        if loop is None or self._stopping:
            raise RuntimeError("BatchPublisher is not running: call start() first")
        states = [(d.owner_id, d.pk, device_state(d)) for d in devices]
        streams = [e for e in events if e.type in _STREAM_EVENTS]
        if not states and not streams:
            return
        with self._lock:
            for owner_id, pk, state in states:
                slot = self._slot(owner_group(owner_id), owner_id)
                if slot.states is None:
                    slot.states = {}
                slot.states[pk] = state
            for event in streams:
                slot = self._slot(device_group(event.device_pk), event.owner_id, event.device_id)
                if event.type == ev.TELEMETRY:
                    if slot.points is None:
                        slot.points = []
                    self.dropped += _append_capped(slot.points, event, MAX_POINTS)
                else:
                    if slot.transitions is None:
                        slot.transitions = []
                    self.dropped += _append_capped(slot.transitions, event, MAX_TRANSITIONS)
            self._idle.clear()
        with contextlib.suppress(RuntimeError):  # the loop closed: stop() raced with us
            loop.call_soon_threadsafe(self._wake)

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is still buffered (within `timeout`), then stop the background thread."""
        if self._thread is None or self._loop is None:
            return
        self._stopping = True
        self._loop.call_soon_threadsafe(self._request_stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("live publisher did not stop within %.1fs", timeout)
        self._thread = None
        self._loop = None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once everything published so far was handed to the layer (for tests, bench)."""
        return self._idle.wait(timeout)

    def _slot(self, group: str, owner_id: int, device_id: str = "") -> _Pending:
        slot = self._pending.get(group)
        if slot is None:
            if len(self._pending) >= self.max_groups:
                _, oldest = self._pending.popitem(last=False)
                self.dropped += oldest.size()
                if oldest.states or oldest.resync:
                    self._resync_owners.add(oldest.owner_id)
            slot = self._pending[group] = _Pending(owner_id=owner_id, device_id=device_id)
        return slot

    # -- background side --

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _request_stop(self) -> None:
        if self._stop_requested is not None:
            self._stop_requested.set()
        self._wake()

    def _take(self) -> OrderedDict[str, _Pending]:
        with self._lock:
            batch, self._pending = self._pending, OrderedDict()
            for owner_id in self._resync_owners:
                group = owner_group(owner_id)
                batch.setdefault(group, _Pending(owner_id=owner_id)).resync = True
            self._resync_owners.clear()
            if not batch:
                self._idle.set()
            return batch

    def _thread_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._run(ready))
        finally:
            loop.close()

    async def _run(self, ready: threading.Event) -> None:
        self._wakeup = asyncio.Event()
        self._stop_requested = asyncio.Event()
        # A layer instance of our own: layers hold loop-bound connections.
        layer = channel_layers.make_backend(self.layer_alias)
        limit = asyncio.Semaphore(self.concurrency)
        watchers = Watchers()
        ready.set()

        async def send(group: str, message: Message) -> None:
            async with limit:
                try:
                    await layer.group_send(group, message)
                    self.sent += 1
                except Exception:
                    self.errors += 1
                    # Logged once per hundred so a dead layer cannot flood the listener's log.
                    if self.errors % 100 == 1:
                        logger.exception(
                            "live publish to %s failed (%d errors)", group, self.errors
                        )

        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                batch = self._take()
                if batch:
                    try:
                        seen = watchers.filter(batch)
                    except Exception:  # the cache is away: send everything rather than nothing
                        logger.warning("live: who watches is unknown", exc_info=True)
                        seen = set(batch)
                    self.unwatched += len(batch) - len(seen)
                    messages = []
                    for group, pending in batch.items():
                        if group in seen:
                            payloads, dropped = pending.payloads()
                            self.dropped += dropped
                            if payloads:
                                messages.append((group, envelope(pending.owner_id, payloads)))
                    await asyncio.gather(*(send(g, m) for g, m in messages))
                    with self._lock:
                        if self._pending or self._resync_owners:
                            self._wakeup.set()
                        else:
                            self._idle.set()
                if self._stop_requested.is_set():
                    if not self._wakeup.is_set():
                        break
                    continue  # drain what came in meanwhile, without waiting
                # Let the next batches accumulate: one message per group per interval.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), self.flush_interval)
        finally:
            closer = getattr(layer, "close", None) or getattr(layer, "close_pools", None)
            if closer is not None:
                try:
                    await closer()
                except Exception:
                    logger.debug("closing the live layer failed", exc_info=True)
