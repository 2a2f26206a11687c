"""The MQTT listener: broker -> batches -> `ingest_batch` -> ack -> live pages.

Threads: paho's network thread reads the socket in large chunks (`BatchingClient`), routes and
parses what each read brought (no database: this overlaps the writer's waits for PostgreSQL) and
appends it, as one list, to a bounded inbox (so a slow database pushes back on the broker
instead of growing memory); one writer thread takes batches of up to
INGEST_BATCH_SIZE messages or INGEST_BATCH_MS milliseconds, commits them in one transaction and
only then acknowledges their QoS 1 PUBLISHes (paho manual ack, one write for the batch). A crash
before the commit leaves the messages unacknowledged, and the broker sends them again to the
persistent session.

Several copies can share the stream through `$share/<group>/…` (MQTT_SHARED_GROUP). The
connection topics (LWT/status, retained) are subscribed without the share: brokers send no
retained messages on shared subscriptions, and every copy needs them to rebuild state after a
restart. Applying them twice is harmless (state changes compare against the locked row).

A copy that is scaled away must not just stop: the broker keeps assigning a share of the stream
to its persistent session. `retire()` (`mqtt_listen --retire`) takes the session over, stops new
messages coming to it, ingests what was queued for it and then ends the session.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import paho.mqtt.client as mqtt
from django import db
from django.conf import settings
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import profiles
from .ingest import (
    BatchResult,
    InboundMessage,
    ingest_batch,
    mark_silent_devices_offline,
    prepare,
    quarantine_unstorable,
)
from .mqtt import BatchingClient, apply_login, mqtt_params, mqtt_protocol

log = logging.getLogger("apps.devices.listener")


@dataclass
class ListenerStats:
    received: int = 0
    stored: int = 0
    quarantined: int = 0
    duplicates: int = 0
    batches: int = 0
    failed_batches: int = 0
    connects: int = 0
    handled: int = 0  # received, committed and acknowledged


class Inbox:
    """Messages from the network thread to the writer, handed over a list at a time.

    Bounded by `limit` messages (a list that arrives below the limit is taken whole). One lock
    round per list, not per message: the network thread and the writer contend for the GIL
    enough as it is. Each list keeps the time it arrived, so that a batch waits to fill at most
    `fill` seconds counted from its oldest message, not from when the writer got to it (messages
    that arrived while the previous batch was being committed have waited already).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: deque[tuple[float, list[InboundMessage]]] = deque()
        self._count = 0
        self._cond = threading.Condition()

    def put(self, items: list[InboundMessage], stop: threading.Event) -> bool:
        """Append, waiting while full; False (nothing appended) once `stop` is set."""
        if not items:
            return True
        with self._cond:
            while self._count >= self.limit:
                if stop.is_set():
                    return False
                self._cond.wait(0.5)
            self._chunks.append((time.monotonic(), items))
            self._count += len(items)
            self._cond.notify_all()
        return True

    def take(self, size: int, wait: float, fill: float) -> list[InboundMessage]:
        """Up to `size` messages: waits up to `wait` s for the first, then until `size` are
        there or the oldest has waited `fill` s."""
        with self._cond:
            if not self._count and not self._cond.wait_for(lambda: self._count, wait):
                return []
            deadline = self._chunks[0][0] + fill
            while self._count < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[InboundMessage] = []
            while self._chunks and len(batch) < size:
                arrived, items = self._chunks.popleft()
                room = size - len(batch)
                if len(items) > room:
                    self._chunks.appendleft((arrived, items[room:]))
                    items = items[:room]
                batch += items
            self._count -= len(batch)
            self._cond.notify_all()
        return batch

    def __len__(self) -> int:
        return self._count


class Listener:
    def __init__(
        self,
        *,
        url: str | None = None,
        group: str | None = None,
        client_id: str | None = None,
        batch_size: int | None = None,
        batch_ms: int | None = None,
        publisher=None,
        sweep_every: float = 10.0,
    ) -> None:
        self.url = url or settings.MQTT_URL
        self.group = settings.MQTT_SHARED_GROUP if group is None else group
        self.batch_size = batch_size or settings.INGEST_BATCH_SIZE
        self.batch_ms = batch_ms or settings.INGEST_BATCH_MS
        self.client_id = (
            client_id
            or "-".join(
                [
                    settings.MQTT_CLIENT_ID_PREFIX,
                    "listener",
                    self.group or "solo",
                    socket.gethostname(),
                ]
            )[:64]
        )
        self.publisher = publisher
        self.sweep_every = sweep_every
        self.stats = ListenerStats()
        self._inbox = Inbox(limit=self.batch_size * 20)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._retiring = False
        self._unsubscribed = threading.Event()
        self._last_received = time.monotonic()
        self._session_present: bool | None = None
        self._client = self._make_client()

    # --- MQTT side --------------------------------------------------------------------------

    def _make_client(self) -> BatchingClient:
        protocol = mqtt_protocol()
        kwargs = {}
        if protocol == mqtt.MQTTv311:
            kwargs["clean_session"] = False  # a persistent session keeps QoS 1 messages for us
        client = BatchingClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            manual_ack=True,
            **kwargs,
        )
        apply_login(client, mqtt_params(self.url))
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=15)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_messages = self._on_messages
        client.on_unsubscribe = self._on_unsubscribe
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("event=connect_refused reason=%s", reason_code)
            return
        self.stats.connects += 1
        filters, connection = profiles.subscriptions()
        subs = []
        for f in filters:
            if self.group and f not in connection:
                subs.append((f"$share/{self.group}/{f}", 1))
            else:
                subs.append((f, 1))
        if self._retiring:
            # Nothing new for this session; what the broker queued for it still comes.
            client.unsubscribe([topic for topic, _qos in subs])
        else:
            client.subscribe(subs)
        self._session_present = bool(flags.session_present)
        self._connected.set()
        log.info(
            "event=connected url=%s client_id=%s group=%s session_present=%s",
            self.url,
            self.client_id,
            self.group or "-",
            flags.session_present,
        )

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._unsubscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("event=disconnected reason=%s (reconnecting)", reason_code)

    def _on_messages(self, received: list[tuple[str, bytes, int, int, bool]]) -> None:
        """What one read of the socket brought (network thread)."""
        self.stats.received += len(received)
        self._last_received = time.monotonic()
        now = datetime.now(UTC)  # one read: the same millisecond
        items = [
            InboundMessage(
                topic=topic, payload=payload, received_at=now, qos=qos, mid=mid, retained=retained
            )
            for topic, payload, qos, mid, retained in received
        ]
        # Routing and parsing need no database: done here, they overlap the writer's waits
        # for PostgreSQL instead of adding to them. Anything unexpected is left to the writer.
        try:
            limit = settings.MQTT_MAX_PAYLOAD
            for item in items:
                item.prepared = prepare(item, limit)
        except Exception:
            log.exception("event=prepare_failed")
        # Blocks while the writer is behind: paho stops reading and TCP pushes back on the
        # broker. Once stopping, an unacknowledged QoS 1 message is simply sent again later.
        self._inbox.put(items, self._stop)

    # --- writer side ------------------------------------------------------------------------

    def _take_batch(self) -> list[InboundMessage]:
        return self._inbox.take(self.batch_size, wait=0.5, fill=self.batch_ms / 1000)

    def _commit(self, batch: list[InboundMessage]) -> None:
        """Ingest one batch, retrying while the database is unavailable. Never drops it."""
        delay = 0.5
        while True:
            try:
                result = ingest_batch(batch)
                break
            except (db.IntegrityError, db.DataError) as exc:
                # Not the database being away: something in the batch. Isolate it.
                log.error("event=batch_rejected size=%d error=%s", len(batch), exc)
                result = self._one_by_one(batch)
                break
            except db.Error as exc:
                self.stats.failed_batches += 1
                log.error(
                    "event=batch_failed size=%d error=%s retry_in=%.1fs", len(batch), exc, delay
                )
                db.close_old_connections()
                for conn in db.connections.all():
                    conn.close_if_unusable_or_obsolete()
                time.sleep(delay)
                delay = min(delay * 2, 10)
        # Only now, after the commit, the broker may forget these messages.
        self._client.ack_many([m.mid for m in batch if m.qos == 1])
        for m in batch:
            if m.qos == 2:  # not subscribed for; a broker that sends it anyway gets PUBCOMP
                self._client.ack(m.mid, m.qos)
        self.stats.handled += len(batch)
        self.stats.batches += 1
        self.stats.stored += result.stored
        self.stats.quarantined += result.quarantined
        self.stats.duplicates += result.duplicates
        self._publish(result)

    def _publish(self, result: BatchResult) -> None:
        if self.publisher is not None and (result.changed_devices or result.events):
            try:
                self.publisher.publish(result.changed_devices, result.events)
            except Exception:  # live pages are best effort; ingest must go on
                log.exception("event=live_publish_failed")

    def _one_by_one(self, batch: list[InboundMessage]) -> BatchResult:
        total = BatchResult()
        for m in batch:
            try:
                r = ingest_batch([m])
            except (db.IntegrityError, db.DataError) as exc:
                quarantine_unstorable(m, exc)
                total.quarantined += 1
                continue
            total.stored += r.stored
            total.quarantined += r.quarantined
            total.duplicates += r.duplicates
            total.events += r.events
            total.changed_devices += r.changed_devices
        return total

    def _writer(self) -> None:
        last_sweep = time.monotonic()
        last_log = time.monotonic()
        while True:
            batch = self._take_batch()
            if batch:
                self._commit(batch)
            elif self._stop.is_set():
                break
            now = time.monotonic()
            if now - last_sweep >= self.sweep_every:
                last_sweep = now
                try:
                    swept = mark_silent_devices_offline()
                except db.Error:
                    log.exception("event=sweep_failed")
                else:
                    self._publish(swept)
            if now - last_log >= 30:
                last_log = now
                log.info("event=stats %s queue=%d", self._stats_line(), len(self._inbox))
        db.connections.close_all()

    def _stats_line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in vars(self.stats).items())

    # --- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Run until `stop()` (SIGTERM/SIGINT); then finish and acknowledge what was received."""
        writer = self._start()
        self._stop.wait()
        self._finish(writer)
        log.info("event=stopped %s pid=%d", self._stats_line(), os.getpid())

    def retire(self, quiet: float = 2.0, timeout: float = 600.0) -> bool:
        """Retire this copy (its client id) from the shared subscription without losing what
        the broker queued for it: resume its session, unsubscribe, ingest and acknowledge the
        queued messages until none came for `quiet` seconds, then end the session (MQTT 5:
        session expiry 0 on DISCONNECT; 3.1.1: a clean-session connect). Returns False if
        the queue was still flowing after `timeout` seconds (the session is then kept)."""
        self._retiring = True
        writer = self._start()
        deadline = time.monotonic() + timeout
        drained = False
        while not self._stop.is_set() and time.monotonic() < deadline:
            if (
                self._unsubscribed.is_set()
                and self.stats.handled == self.stats.received
                and time.monotonic() - self._last_received >= quiet
            ):
                drained = True
                break
            self._stop.wait(0.1)
        self._stop.set()
        self._finish(writer, end_session=drained)
        log.info(
            "event=%s %s session_present=%s pid=%d",
            "retired" if drained else "retire_incomplete",
            self._stats_line(),
            self._session_present,
            os.getpid(),
        )
        return drained

    def _start(self) -> threading.Thread:
        params = mqtt_params(self.url)
        connect_kwargs = {}
        if mqtt_protocol() == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 24 * 3600  # keep our QoS 1 messages while we restart
            props.ReceiveMaximum = min(65535, self.batch_size * 4)
            connect_kwargs = {"clean_start": False, "properties": props}
        writer = threading.Thread(target=self._writer, name="ingest-writer", daemon=True)
        writer.start()
        if self.publisher is not None:
            self.publisher.start()
        while not self._stop.is_set():
            try:
                self._client.connect(params["host"], params["port"], keepalive=30, **connect_kwargs)
                break
            except OSError as exc:
                log.warning("event=connect_failed url=%s error=%s retry_in=2s", self.url, exc)
                self._stop.wait(2)
        self._client.loop_start()
        return writer

    def _finish(self, writer: threading.Thread, *, end_session: bool = False) -> None:
        # Drain: keep the connection so that the last batches can still be acknowledged.
        deadline = time.monotonic() + 10
        while len(self._inbox) and time.monotonic() < deadline:
            time.sleep(0.05)
        writer.join(timeout=15)
        v5 = mqtt_protocol() == mqtt.MQTTv5
        if end_session and v5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0  # the broker discards the session now
            self._client.disconnect(properties=props)
        else:
            self._client.disconnect()
        self._client.loop_stop()
        if end_session and not v5:
            self._clean_session_v311()
        if self.publisher is not None:
            self.publisher.stop()

    def _clean_session_v311(self) -> None:
        """MQTT 3.1.1 has no session expiry: a clean-session connect discards the session."""
        params = mqtt_params(self.url)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        apply_login(client, params)
        connected = threading.Event()
        client.on_connect = lambda *_args: connected.set()
        client.connect(params["host"], params["port"], keepalive=30)
        client.loop_start()
        try:
            if not connected.wait(10):
                log.warning("event=retire_clean_session_failed client_id=%s", self.client_id)
            client.disconnect()
        finally:
            client.loop_stop()

    def stop(self) -> None:
        self._stop.set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)
