"""The delivery pipeline: one drain loop per `forwarding.drain` task, for every kind.

A drain loop, until its time budget is spent or it has had nothing to do for LINGER seconds:

1. every DISCOVERY_INTERVAL, find enabled destinations with due rows (one index probe per
   enabled destination on the partial "due" index — cheap however long the backlog is);
2. for each, in rotating order: ask the kind's transport how many more rows it may take now
   (per-destination in-flight cap), take that many from the per-destination and per-owner rate
   limits, claim that many rows (atomically, oldest first) and hand them to the transport;
3. collect results as they come back and record them in batches.

Nothing here waits on one destination: a hanging receiver fills its own in-flight cap and is
skipped until its requests time out, while every other destination keeps being claimed and
sent. Several drain tasks (Celery concurrency, several workers) run side by side on disjoint
rows. A lingering loop picks up new rows by itself, which is why the outbox may coalesce kicks.

A worker being stopped calls `shut_down` in its processes (see `tasks.stoppable`): running loops
claim nothing more, finish and record what is in flight, and end; loops started afterwards end
at once. What is left stays due for the next worker (the periodic sweep kicks it).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from django.db import connection
from django.utils import timezone

from . import actions, claims, kinds, pump, ratelimit
from .claims import Progress, Result
from .kinds import TargetConfig
from .models import Delivery, Destination, Status

log = logging.getLogger(__name__)

# The loops running in this process (one per drain task; several in the threads pool), for
# `shut_down`. A plain dict: adding, removing and copying its values are each one step under
# the GIL, so a signal handler may read it while a loop's thread changes it.
_running: dict[int, Drainer] = {}
_shutting_down = False

DISCOVERY_INTERVAL = 0.1  # seconds between looks for newly due destinations
LINGER = 2.0  # an idle loop keeps looking this long before its task ends
CONFIG_TTL = 10.0  # destination settings are re-read this often (edits, rotations)
RECORD_BATCH = 500
RECORD_EVERY = 0.05  # seconds: results are written at least this often


@dataclass
class DrainStats:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    stale: int = 0
    budget_spent: bool = False
    stopped: bool = False  # by stop(): the worker is shutting down


def due_destinations() -> list[tuple[int, str]]:
    """(id, kind) of enabled destinations that have deliveries due now.

    A correlated scalar subquery with LIMIT 1, not EXISTS: PostgreSQL turns EXISTS into a
    semi-join that reads every due row of the partial index (tens of milliseconds with a large
    backlog); a LIMITed subquery cannot be flattened, so it stays one index probe per enabled
    destination, whatever the backlog. The status is written into the text, so that the planner
    sees the partial index's predicate whatever the binding.

    Raw SQL: every drain loop asks ten times a second, and building the same queryset through
    the ORM cost ~1.7 ms of CPU each time (a tenth of a delivery worker's CPU at 8,000 events/s).
    """
    with connection.cursor() as cursor:
        cursor.execute(_due_sql(), [timezone.now()])
        return [(pk, kind) for pk, kind in cursor.fetchall()]


@functools.cache
def _due_sql() -> str:
    qn = connection.ops.quote_name
    destination, delivery = Destination._meta, Delivery._meta

    def column(meta, name: str) -> str:
        return qn(meta.get_field(name).column)

    # Identifiers from the models' meta, quoted; the one value is bound.
    return (
        f"SELECT d.{column(destination, 'id')}, d.{column(destination, 'kind')} "  # noqa: S608
        f"FROM {qn(destination.db_table)} d WHERE d.{column(destination, 'enabled')} AND ("
        f"SELECT r.{column(delivery, 'id')} FROM {qn(delivery.db_table)} r "
        f"WHERE r.{column(delivery, 'destination')} = d.{column(destination, 'id')} "
        f"AND r.{column(delivery, 'status')} = '{Status.PENDING.value}' "
        f"AND r.{column(delivery, 'next_attempt_at')} <= %s LIMIT 1) IS NOT NULL "
        f"ORDER BY d.{column(destination, 'id')}"
    )


class Drainer:
    def __init__(
        self,
        budget: float,
        linger: float = LINGER,
        stop_requested: Callable[[], bool] | None = None,
    ) -> None:
        self.budget = budget
        self.linger = linger
        # Asked every DISCOVERY_INTERVAL: True once the worker running this loop is stopping.
        self.stop_requested = stop_requested
        self.token = uuid.uuid4().hex
        self.pump = pump.pump()
        self.in_flight: dict[int, int] = defaultdict(int)
        self.total_in_flight = 0
        self.configs: dict[int, TargetConfig] = {}
        self.loaded_at: dict[int, float] = {}
        self.drained: set[int] = set()
        # Destinations whose transport claims for itself (`pulls`), kicked and not yet idle.
        self.pulling: set[int] = set()
        self.released = False
        self.pending: list[Result] = []
        self.last_record = time.monotonic()
        self.rotation = 0
        self.stats = DrainStats()
        self.stopping = False

    def stop(self) -> None:
        """Ask the loop to stop claiming and finish what is in flight (thread-safe)."""
        self.stopping = True

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> DrainStats:
        start = time.monotonic()
        end = start + self.budget
        last_work = start
        next_discovery = start
        active: list[int] = []
        _running[id(self)] = self
        if _shutting_down:
            self.stopping = True
        try:
            while True:
                now = time.monotonic()
                if now >= next_discovery and self.stop_requested and self.stop_requested():
                    self.stopping = True
                claiming = now < end and not self.stopping
                if claiming and now >= next_discovery:
                    active = self._discover()
                    next_discovery = now + DISCOVERY_INTERVAL
                claimed = self._claim(active) if claiming else 0
                if not claiming:
                    self._release()
                busy = self.total_in_flight or self.pulling
                collected = self._collect(0.02 if busy else 0.0)
                self._maybe_record(force=not self.total_in_flight)
                if claimed or collected or self.total_in_flight or self.pulling:
                    last_work = now
                    continue
                if not claiming:
                    self.stats.stopped = self.stopping
                    self.stats.budget_spent = not self.stopping
                    break
                if now - last_work > self.linger:
                    break
                time.sleep(DISCOVERY_INTERVAL)
        finally:
            try:
                self._finish()
            finally:
                _running.pop(id(self), None)
        return self.stats

    def _finish(self) -> None:
        """Stop claiming; wait for what is in flight (bounded by the longest lease) and record."""
        self._release()
        longest = max((c.lease_seconds for c in self.configs.values()), default=0.0)
        deadline = time.monotonic() + longest
        while (self.total_in_flight or self.pulling) and time.monotonic() < deadline:
            self._collect(0.1)
            self._maybe_record(force=False)
        self._maybe_record(force=True)
        if self.total_in_flight:
            # Their leases will expire and the sweep will put them back in line.
            log.warning("drain ended with %d deliveries unanswered", self.total_in_flight)

    # --- steps ----------------------------------------------------------------------------------

    def _discover(self) -> list[int]:
        self.drained.clear()
        found = due_destinations()
        now = time.monotonic()
        stale: dict[str, list[int]] = defaultdict(list)
        for destination_id, kind in found:
            if now - self.loaded_at.get(destination_id, -CONFIG_TTL) >= CONFIG_TTL:
                stale[kind].append(destination_id)
        for kind, ids in stale.items():
            if kind not in kinds.KINDS:
                log.error("destinations %s have unknown kind %r", ids, kind)
                continue
            loaded = kinds.transport(kind).load(ids)
            for destination_id in ids:
                self.loaded_at[destination_id] = now
                if destination_id in loaded:
                    self.configs[destination_id] = loaded[destination_id]
                else:
                    self.configs.pop(destination_id, None)
        return [d for d, _kind in found if d in self.configs]

    def _claim(self, active: list[int]) -> int:
        total = 0
        count = len(active)
        if not count:
            return 0
        first = self.rotation % count
        self.rotation += 1
        for i in range(count):
            destination_id = active[(first + i) % count]
            config = self.configs.get(destination_id)
            if config is None or destination_id in self.drained:
                continue  # disabled since the last discovery (410), or nothing left
            transport = kinds.transport(config.kind)
            if getattr(transport, "pulls", False):
                if destination_id not in self.pulling and transport.kick(config, self.pump.report):
                    self.pulling.add(destination_id)
                    total += 1
                continue
            in_flight = self.in_flight[destination_id]
            free = transport.capacity(config, in_flight)
            # Claim in chunks, not one row per freed slot: fewer, larger statements.
            if free <= 0 or (in_flight and free < (free + in_flight) // 4):
                continue
            granted = ratelimit.grant(config, free)
            if not granted:
                continue
            rows = claims.claim(destination_id, granted, self.token, config.lease_seconds)
            if len(rows) < granted:
                self.drained.add(destination_id)
            if not rows:
                continue
            self.in_flight[destination_id] += len(rows)
            self.total_in_flight += len(rows)
            self.stats.claimed += len(rows)
            total += len(rows)
            transport.start(config, rows, self.pump.report)
        return total

    def _collect(self, wait: float) -> int:
        """Run the transports' I/O for up to `wait` seconds; take the results that came in."""
        taken: list[Result | Progress] = self.pump.run(wait)
        results: list[Result] = []
        for item in taken:
            if isinstance(item, Progress):  # a self-claiming transport's batch, recorded
                self.stats.claimed += item.rows
                self.stats.delivered += item.delivered
                self.stats.retried += item.retried
                self.stats.failed += item.failed
                self.stats.stale += item.stale
                if item.idle:
                    self.pulling.discard(item.destination_id)
                    self.drained.add(item.destination_id)  # no new kick before rediscovery
                continue
            self.in_flight[item.destination_id] -= 1
            results.append(item)
        self.total_in_flight -= len(results)
        self.pending.extend(results)
        return len(taken)

    def _release(self) -> None:
        """Stop claiming: self-claiming transports finish their batch in hand, then idle."""
        if self.released:
            return
        self.released = True
        for destination_id in self.pulling:
            config = self.configs.get(destination_id)
            if config is not None:
                kinds.transport(config.kind).release(destination_id)

    def _maybe_record(self, force: bool) -> None:
        if not self.pending:
            return
        if not force and (
            len(self.pending) < RECORD_BATCH and time.monotonic() - self.last_record < RECORD_EVERY
        ):
            return
        batch, self.pending = self.pending, []
        self.last_record = time.monotonic()
        policies = {
            r.destination_id: self.configs[r.destination_id].policy
            for r in batch
            if r.destination_id in self.configs
        }
        recorded = claims.record(batch, self.token, policies)
        self.stats.delivered += recorded.delivered
        self.stats.retried += recorded.retried
        self.stats.failed += recorded.failed
        self.stats.stale += recorded.stale
        for destination_id in recorded.gone_destinations:
            actions.destination_gone(destination_id)
            self.configs.pop(destination_id, None)
            self.loaded_at.pop(destination_id, None)


def shut_down() -> int:
    """This process is stopping: every drain loop running in it stops claiming, finishes what
    it has in flight and ends, and loops started from now on end at once. Returns how many
    were running and not yet stopping. Only sets flags, so it is safe in a signal handler."""
    global _shutting_down
    _shutting_down = True
    asked = 0
    for drainer in list(_running.values()):
        if not drainer.stopping:
            drainer.stop()
            asked += 1
    return asked


# One drain loop per process at a time. Loops share the process's pump, whose event loop cannot
# run twice at once ("This event loop is already running"): with Celery's threads pool (`make
# run`) a second drain task failed whenever a kick came while one was running. The running loop
# serves every destination, and finds new rows by itself, so the second task has nothing to add.
_one_loop = threading.Lock()


def _new_lock_after_fork() -> None:
    global _one_loop
    _one_loop = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def drain(
    budget: float, linger: float = LINGER, stop_requested: Callable[[], bool] | None = None
) -> DrainStats:
    if not _one_loop.acquire(blocking=False):
        log.debug("drain: a loop is already running in this process")
        return DrainStats()
    try:
        with claims.bookkeeping_without_fsync():
            stats = Drainer(budget, linger, stop_requested).run()
    finally:
        _one_loop.release()
    log.debug("drain: %s", stats)
    return stats
