"""The database kind's `kinds.Transport`: batches of rows into owners' tables.

Per destination and worker process there is one `Sink`: a writer thread that owns the
destination's one connection (the "pool" of one: opened on first use, kept while rows keep
coming, closed after POOL_IDLE seconds without any). The pipeline's drain loop only kicks it
(`pulls = True`: nothing is handed over). While kicked, the thread claims up to `batch_size` due
rows itself — at once after a full batch, one `flush_interval` after a partial one — writes them
in one transaction (`writer.py`), records their outcome and reports a `Progress` per batch
(`pull`). On PostgreSQL the rows are claimed by locking them for the batch's transaction, so
one update per row records the outcome; several worker processes pulling one destination take
disjoint rows (`SKIP LOCKED`).

A thread per active destination, not a shared pool: a slow or hanging owner database then ties
up its own thread only, never another destination's writes (statement and lock timeouts bound
it anyway).

Health (see `actions.py`): a batch failing for anything but its content pauses the destination
for a back-off step; `_grant` then gives nothing until the pause is over, and one probe row
after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType
from typing import Any, NamedTuple

from django.conf import settings as django_settings
from django.db import connection as db_connection
from django.db import transaction
from django.utils import timezone

from .. import claims, ratelimit
from ..claims import Claimed, Progress, Result
from ..kinds import TargetConfig, TestResult
from ..models import Outcome
from . import actions, connection_test, mapping, mysql, postgres, writer
from .base import (
    CONNECT_TIMEOUT,
    STATEMENT_TIMEOUT,
    ConnectionSettings,
    ErrorClass,
    SinkError,
    TableInfo,
    Target,
)
from .models import BatchOutcome, DatabaseDestination, Engine

log = logging.getLogger(__name__)

ENGINES: dict[str, ModuleType] = {Engine.POSTGRES: postgres, Engine.MYSQL: mysql}

POOL_IDLE = 60.0  # seconds a destination's connection stays open without rows
PING_AFTER = 30.0  # a connection idle this long is checked before it is used again
# The longest one batch can take: connect, the statements, bisection, the commit.
WRITE_BOUND = CONNECT_TIMEOUT + writer.SPLIT_DEADLINE + 2 * STATEMENT_TIMEOUT
LEASE_MARGIN_DEFAULT = 30.0


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    name: str
    connection: ConnectionSettings
    target: Target
    mapping: tuple[tuple[str, str], ...]
    batch_size: int
    flush_interval: float  # seconds
    # Health as loaded (the transport keeps its own, fresher copy once running).
    failure_streak: int
    paused_until: float | None  # epoch seconds

    def __repr__(self) -> str:
        return f"DatabaseSettings({self.name!r}, {self.connection!r}, table={self.target.table})"


@dataclass
class Health:
    streak: int = 0
    paused_until: float = 0.0  # epoch seconds; 0 when not paused


def _engine(settings: DatabaseSettings) -> ModuleType:
    return ENGINES[settings.connection.engine]


# --- one connection, owned by a sink's thread ---------------------------------------------------


@dataclass
class Session:
    """A destination's open connection and what was learnt about its table."""

    conn: Any = None
    version: float | None = None
    engine: ModuleType | None = None
    table: TableInfo | None = None
    converters: list[Callable[[Any], Any]] = field(default_factory=list)
    renderer: mapping.Renderer | None = None
    last_used: float = 0.0

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                self.conn.close()
        self.conn = None
        self.table = None

    def ready(self, config: TargetConfig) -> bool:
        """Connect (or reuse) and check the table against the mapping; raises SinkError.

        Returns whether an existing connection was reused (a stale one may then be retried)."""
        settings: DatabaseSettings = config.settings
        if self.conn is not None and self.version != config.version:
            self.close()  # the destination was edited: new connection, new checks
        if self.conn is not None and time.monotonic() - self.last_used > PING_AFTER:
            try:
                self.engine.ping(self.conn)  # type: ignore[union-attr]
            except Exception:
                self.close()
        if self.conn is not None:
            return True
        engine = _engine(settings)
        self.conn = engine.connect(settings.connection)
        self.engine = engine
        self.version = config.version
        try:
            self._introspect(settings)
        except Exception:
            self.close()
            raise
        return False

    def _introspect(self, settings: DatabaseSettings) -> None:
        engine, target = self.engine, settings.target
        try:
            table = engine.table_info(self.conn, target.schema, target.table)  # type: ignore[union-attr]
        except Exception as exc:
            raise engine.classify(exc) from exc  # type: ignore[union-attr]
        if table is None:
            raise SinkError(
                ErrorClass.DESTINATION, f"The table {target.schema}.{target.table} does not exist."
            )
        problem = connection_test.mapping_problem(settings.connection.engine, target, table)
        if problem:
            raise SinkError(ErrorClass.DESTINATION, problem)
        name = settings.connection.engine
        columns = connection_test.columns_by_name(name, table)
        engine.prepare(self.conn, target)  # type: ignore[union-attr]
        self.table = table
        self.converters = [
            engine.converter(columns[connection_test.column_key(name, c)])  # type: ignore[union-attr]
            for c in target.columns
        ]
        self.renderer = mapping.Renderer([list(pair) for pair in settings.mapping])


# --- a destination's writer thread ----------------------------------------------------------


class Sink:
    """A destination's writer thread in this worker process.

    While kicked by a drain loop it pulls: claims a batch of due rows, writes it, records the
    outcome, and again — at once after a full batch, one flush interval after a partial one —
    until nothing is due, the loop releases it, or the destination is paused. Then it waits for
    the next kick, keeping its connection for POOL_IDLE seconds.
    """

    def __init__(self, transport: DatabaseTransport, destination_id: int) -> None:
        self.transport = transport
        self.destination_id = destination_id
        self.cond = threading.Condition()
        self.config: TargetConfig | None = None
        self.report: Report | None = None
        self.pulling = False
        self.thread: threading.Thread | None = None
        self.closing = False

    def kick(self, config: TargetConfig, report: Report) -> None:
        with self.cond:
            self.config, self.report = config, report
            self.pulling = True
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name=f"db-sink-{self.destination_id}", daemon=True
                )
                self.thread.start()
            self.cond.notify()

    def release(self) -> None:
        """Stop pulling after the batch in hand (the drain loop's budget is spent)."""
        with self.cond:
            self.pulling = False
            self.cond.notify()

    def close(self) -> threading.Thread | None:
        with self.cond:
            self.closing = True
            self.pulling = False
            self.cond.notify()
            return self.thread

    def _wait_for_kick(self) -> tuple[TargetConfig, Report] | None:
        idle_since = time.monotonic()
        with self.cond:
            while True:
                if self.closing:
                    self.thread = None
                    return None
                if self.pulling:
                    assert self.config is not None and self.report is not None
                    return self.config, self.report
                waited = time.monotonic() - idle_since
                if waited >= POOL_IDLE:
                    self.thread = None
                    return None
                self.cond.wait(POOL_IDLE - waited)

    def _rest(self, seconds: float) -> bool:
        """Wait up to `seconds` (a flush interval); False if released or closed meanwhile."""
        with self.cond:
            if seconds > 0:
                self.cond.wait_for(lambda: self.closing or not self.pulling, seconds)
            return self.pulling and not self.closing

    def _idle(self) -> None:
        with self.cond:
            self.pulling = False

    def _run(self) -> None:
        session = Session()
        try:
            while (kicked := self._wait_for_kick()) is not None:
                config, report = kicked
                more = False
                try:
                    taken, more = self.transport.pull(session, config)
                except Exception:
                    log.exception("database sink destination=%s", self.destination_id)
                    taken = None
                    db_connection.close()  # whatever it was, start the next try afresh
                    time.sleep(1.0)  # never a hot loop on a persistent fault
                if more and taken is not None and taken.rows < config.settings.batch_size:
                    # A partial batch: gather for one flush interval before the next claim.
                    more = self._rest(config.settings.flush_interval)
                elif more:
                    more = self._rest(0)  # unless released meanwhile
                if not more:
                    self._idle()
                _deliver_progress(
                    report,
                    taken or Progress(self.destination_id),
                    idle=not more,
                )
        finally:
            session.close()
            db_connection.close()  # this thread's connection to the platform's database


Report = Callable[[Any], None]


def _deliver_progress(report: Report, progress: Progress, idle: bool) -> None:
    """Tell the drain loop (through its pump, from this thread) what a batch came to."""
    progress.idle = idle
    pump = getattr(report, "__self__", None)
    loop = getattr(pump, "loop", None)
    if loop is not None and hasattr(pump, "report_threadsafe"):
        with contextlib.suppress(RuntimeError):  # the loop was closed (worker shutting down)
            loop.call_soon_threadsafe(report, progress)
    else:  # a plain callable (a queue's put): thread-safe itself
        report(progress)


# --- the transport ------------------------------------------------------------------------------


class DatabaseTransport:
    """The database kind's `kinds.Transport`."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._sinks: dict[int, Sink] = {}
        self._health: dict[int, Health] = {}
        self._pruned_at = 0.0
        # Events per outbox row lately, per destination (packs: see outbox.py), to claim about
        # a batch's worth of rows. Each destination's key is only touched by its sink's thread.
        self._per_row: dict[int, float] = {}

    def _forked(self) -> None:
        # Threads (and their connections) do not survive a fork (Celery prefork): start afresh.
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._sinks = {}
            self._health = {}
            self._lock = threading.Lock()

    # --- the pipeline's side (drain thread) ------------------------------------------------------

    # Sinks claim their own rows (see `pull`): the drain loop kicks them instead of claiming.
    pulls = True

    def load(self, destination_ids: Collection[int]) -> dict[int, TargetConfig]:
        self._forked()
        margin = getattr(django_settings, "DELIVERY_LEASE_MARGIN", LEASE_MARGIN_DEFAULT)
        configs = {}
        for destination in DatabaseDestination.objects.filter(pk__in=destination_ids, enabled=True):
            try:
                configs[destination.pk] = self.config(destination, margin)
            except Exception:
                # A password that no longer decrypts (wrong key) must not stop other owners.
                log.exception("destination %s: cannot load its settings", destination.pk)
                continue
            with self._lock:
                # The database holds the truth across processes; a pause this process set is
                # already there (written before its rows were reported).
                self._health[destination.pk] = Health(
                    destination.failure_streak,
                    destination.paused_until.timestamp() if destination.paused_until else 0.0,
                )
        return configs

    def config(self, destination: DatabaseDestination, margin: float) -> TargetConfig:
        settings = DatabaseSettings(
            name=destination.name,
            connection=destination.connection_settings(),
            target=destination.target(),
            mapping=tuple((c, e) for c, e in destination.column_mapping),
            batch_size=destination.batch_size,
            flush_interval=destination.flush_interval_ms / 1000,
            failure_streak=destination.failure_streak,
            paused_until=(
                destination.paused_until.timestamp() if destination.paused_until else None
            ),
        )
        return TargetConfig(
            destination_id=destination.pk,
            owner_id=destination.owner_id,
            kind="database",
            version=destination.updated_at.timestamp(),
            policy=destination.retry_policy(),
            rate_limit=destination.rate_limit,
            # Leases are only used where rows cannot be held by a lock (SQLite): one batch.
            lease_seconds=WRITE_BOUND + margin,
            settings=settings,
        )

    def capacity(self, config: TargetConfig, in_flight: int) -> int:
        return 0  # nothing is handed over: sinks claim for themselves

    def start(
        self, config: TargetConfig, rows: list[Claimed], report: Callable[[Result], None]
    ) -> None:
        raise NotImplementedError("database sinks claim their own rows; use kick()")

    def kick(self, config: TargetConfig, report: Report) -> bool:
        """Have this destination's sink pull due rows until none are left. False while the
        destination is paused after a failure (its next probe is due later)."""
        self._forked()
        with self._lock:
            health = self._health.setdefault(config.destination_id, Health())
            if health.streak and health.paused_until > time.time():
                return False
            sink = self._sinks.get(config.destination_id)
            if sink is None:
                sink = self._sinks[config.destination_id] = Sink(self, config.destination_id)
        sink.kick(config, report)
        return True

    def release(self, destination_id: int) -> None:
        with self._lock:
            sink = self._sinks.get(destination_id)
        if sink is not None:
            sink.release()

    def test(self, destination: DatabaseDestination) -> TestResult:
        return connection_test.run(destination)

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            sinks = list(self._sinks.values())
            self._sinks.clear()
            self._health.clear()
        threads = [t for t in (s.close() for s in sinks) if t is not None]
        for thread in threads:
            thread.join(timeout=WRITE_BOUND)

    # --- the sink thread's side ------------------------------------------------------------------

    def _grant(self, config: TargetConfig) -> tuple[int, bool]:
        """How many events the next batch may take, and whether the rate limits cut that: the
        batch size, within the rate limits; one probe row (a pack, whatever its size) when a
        failing destination's pause is over; none while it is paused."""
        health = self._health_of(config)
        if health.streak:
            if health.paused_until > time.time():
                return 0, False
            if not actions.claim_probe(config.destination_id, config.lease_seconds):
                with self._lock:
                    health.paused_until = time.time() + 1.0  # another process probes
                return 0, False
            return 1, False
        wanted = config.settings.batch_size
        granted = ratelimit.grant(config, wanted)
        return granted, granted < wanted

    def pull(self, session: Session, config: TargetConfig) -> tuple[Progress | None, bool]:
        """Claim, write and record one batch. Returns what it came to (None: nothing was due)
        and whether to go on pulling.

        On PostgreSQL the rows are claimed by locking them for this transaction (`lock_due`),
        and their outcome is written in the same transaction, after the owner's commit: one
        update per delivery. If the worker dies in between, nothing was recorded and the rows
        are due again at once (at-least-once: an upsert makes the repeat harmless). Elsewhere
        (SQLite) rows are leased first, as webhooks are.
        """
        limit, limited = self._grant(config)  # events
        if not limit:
            return None, False
        destination_id = config.destination_id
        policies = {destination_id: config.policy}
        # Rows carry up to a batch of events each (packs): claim about `limit` events' worth.
        per_row = self._per_row.get(destination_id, 1.0)
        wanted = max(1, int(limit / per_row))
        if db_connection.vendor == "postgresql":
            with transaction.atomic():
                with db_connection.cursor() as cursor:
                    # Only the workers' own bookkeeping: see claims.bookkeeping_without_fsync.
                    cursor.execute("SET LOCAL synchronous_commit TO OFF")
                # Rows locked beyond `limit` events stay untouched (unlocked at commit).
                rows = _within(claims.lock_due(destination_id, wanted), limit)
                if limited and rows and rows[0].events > limit:
                    # The rate limit left less than the next pack this second (packs are at
                    # most the limit, see outbox.routes_for): it goes in a later second.
                    rows = []
                if not rows:
                    return None, False
                results = self.flush(session, config, rows)
                recorded = claims.record(results, None, policies)
        else:
            token = uuid.uuid4().hex
            # The same cut as `_within` above, and the same wait for a pack the rate limit has
            # no room for, made in the claim: a leased row would have to be given back.
            rows = claims.claim(
                destination_id, wanted, token, config.lease_seconds, events=(limit, not limited)
            )
            if not rows:
                return None, False
            results = self.flush(session, config, rows, token)
            recorded = claims.record(results, token, policies)
        events = sum(row.events for row in rows)
        self._per_row[destination_id] = events / len(rows)
        progress = Progress(
            destination_id,
            rows=events,
            delivered=recorded.delivered,
            retried=recorded.retried,
            failed=recorded.failed,
            stale=recorded.stale,
        )
        return progress, not self._health_of(config).streak

    def flush(
        self,
        session: Session,
        config: TargetConfig,
        rows: list[Claimed],
        token: str | None = None,
    ) -> list[Result]:
        """Write one batch to the owner's table; one `Result` per outbox row, and one per event
        split out of a pack (below). `token`: the rows' lease (None: locked, PostgreSQL)."""
        started = timezone.now()
        t0 = time.perf_counter()
        items, spans = _unpack(rows)
        outcomes: list[tuple[str, str]] = [(Outcome.RETRY, "Internal error")] * len(items)
        statements = 0
        failure: SinkError | None = None
        try:
            for try_number in (1, 2):
                reused = session.conn is not None
                try:
                    reused = session.ready(config)
                    session.last_used = time.monotonic()
                    statements = self._write(session, config, items, outcomes)
                    failure = None
                    break
                except SinkError as exc:
                    failure = exc
                    session.close()
                    # A pooled connection the server dropped while idle: one fresh try at once.
                    if not (try_number == 1 and reused and exc.kind is ErrorClass.NETWORK):
                        break
        except Exception:
            # A bug must not strand the rows: they are retried on the schedule.
            log.exception("database destination=%s: writing a batch", config.destination_id)
            session.close()
            outcomes = [(Outcome.RETRY, "Internal error")] * len(items)
        duration_ms = int((time.perf_counter() - t0) * 1000)

        if failure is not None:
            outcomes = [(Outcome.RETRY, failure.message)] * len(items)
            log.info(
                "database destination=%s batch of %d failed (%s): %s",
                config.destination_id,
                len(items),
                failure.kind.value,
                failure.message,
            )
            pause = actions.pause_for(config.policy, self._health_of(config).streak + 1)
            with self._lock:
                health = self._health.setdefault(config.destination_id, Health())
                health.streak += 1
                health.paused_until = time.time() + pause

        self._record(config, items, outcomes, failure, started, duration_ms, statements)

        def result(row: Claimed, outcome: str, error: str, events: int) -> Result:
            return Result(
                delivery_id=row.id,
                destination_id=config.destination_id,
                owner_id=row.owner_id,
                attempt=row.attempt,
                started_at=started,
                duration_ms=duration_ms,
                outcome=outcome,
                error=error,
                # Written rows are in the batch log; only failures get their own row.
                logged=outcome != Outcome.DELIVERED,
                events=events,
            )

        results = []
        for row, (start, end) in zip(rows, spans, strict=True):
            mine = outcomes[start:end]
            if not mine:  # a pack of no events (none is written so): nothing to do
                results.append(result(row, Outcome.DELIVERED, "", 0))
                continue
            if all(o == mine[0] for o in mine):
                results.append(result(row, *mine[0], end - start))
                continue
            # A pack whose events fared differently: the row keeps the written ones (or, if
            # none was, the first event's lot), every other event gets a row of its own, so a
            # dead letter is shown, replayed and retried by itself.
            keep = next((o for o in mine if o[0] == Outcome.DELIVERED), mine[0])
            kept = [items[start + i].payload for i, o in enumerate(mine) if o == keep]
            apart = [(items[start + i].payload, o) for i, o in enumerate(mine) if o != keep]
            split = claims.split_out(row, kept, [p for p, _ in apart], token, config.lease_seconds)
            results.append(result(row, *keep, len(kept)))
            for twin, (_payload, (outcome, error)) in zip(split, apart, strict=True):
                results.append(result(twin, outcome, error, 1))
        return results

    def _health_of(self, config: TargetConfig) -> Health:
        with self._lock:
            return self._health.setdefault(config.destination_id, Health())

    def _write(
        self,
        session: Session,
        config: TargetConfig,
        claimed: list[Item],
        outcomes: list[tuple[str, str]],
    ) -> int:
        """Render, convert and write; fills `outcomes`; returns the statements used."""
        settings: DatabaseSettings = config.settings
        target = settings.target
        renderer, converters = session.renderer, session.converters
        assert renderer is not None
        rows: list[list[Any]] = []
        indexes: list[int] = []
        latest: dict[tuple, int] = {}  # upsert: key -> position in rows
        key_positions = [target.columns.index(k) for k in target.key_columns]
        for index, row in enumerate(claimed):
            if row.owner_id != config.owner_id:
                # Never another owner's event in this owner's database, whatever happened.
                log.error(
                    "delivery %s of owner %s reached destination %s of owner %s",
                    row.id,
                    row.owner_id,
                    config.destination_id,
                    config.owner_id,
                )
                outcomes[index] = (Outcome.FAILED, "Refused: not an event of this owner")
                continue
            try:
                values = [
                    convert(value)
                    for convert, value in zip(converters, renderer.render(row.payload), strict=True)
                ]
            except (ValueError, TypeError, OverflowError) as exc:
                column = _failing_column(renderer, converters, row.payload, target)
                outcomes[index] = (Outcome.FAILED, f"Column {column}: {exc}"[:300])
                continue
            if key_positions:
                key = tuple(_hashable(values[p]) for p in key_positions)
                previous = latest.get(key)
                if previous is not None:
                    # The same key twice in one batch: the later event wins (PostgreSQL refuses
                    # to update one row twice in a statement); the earlier one is superseded.
                    outcomes[indexes[previous]] = (Outcome.DELIVERED, "")
                    rows[previous] = values
                    indexes[previous] = index
                    continue
                latest[key] = len(rows)
            rows.append(values)
            indexes.append(index)
        written = writer.write_batch(session.engine, session.conn, target, rows, indexes)  # type: ignore[arg-type]
        for index in written.written:
            outcomes[index] = (Outcome.DELIVERED, "")
        for index, message in written.rejected.items():
            outcomes[index] = (Outcome.FAILED, f"Rejected by the database: {message}"[:300])
        for index in written.postponed:
            outcomes[index] = (Outcome.RETRY, "Not written: the batch had too many bad rows")
        return written.statements

    def _record(
        self,
        config: TargetConfig,
        rows: list[Item],
        outcomes: list[tuple[str, str]],
        failure: SinkError | None,
        started: datetime,
        duration_ms: int,
        statements: int,
    ) -> None:
        """The batch log and the destination's health, in the platform's database. In a
        savepoint: a failure here is logged and must not undo the batch's outcome."""
        try:
            with transaction.atomic():
                self._record_batch(
                    config, rows, outcomes, failure, started, duration_ms, statements
                )
        except Exception:
            log.exception("database destination=%s: recording the batch", config.destination_id)

    def _record_batch(
        self,
        config: TargetConfig,
        rows: list[Item],
        outcomes: list[tuple[str, str]],
        failure: SinkError | None,
        started: datetime,
        duration_ms: int,
        statements: int,
    ) -> None:
        if failure is None:
            if self._health_of(config).streak or config.settings.failure_streak:
                actions.batch_succeeded(config.destination_id)
                with self._lock:
                    self._health[config.destination_id] = Health()
        else:
            until = actions.batch_failed(config.destination_id, failure, config.policy)
            with self._lock:
                health = self._health.setdefault(config.destination_id, Health())
                health.paused_until = max(health.paused_until, until.timestamp())
        delivered = sum(o == Outcome.DELIVERED for o, _e in outcomes)
        rejected = sum(o == Outcome.FAILED for o, _e in outcomes)
        retried = sum(o == Outcome.RETRY for o, _e in outcomes)
        if failure is not None:
            outcome = (
                BatchOutcome.ERROR if failure.kind is ErrorClass.DESTINATION else BatchOutcome.RETRY
            )
        else:
            outcome = BatchOutcome.PARTIAL if rejected or retried else BatchOutcome.WRITTEN
        errors = [e for o, e in outcomes if o != Outcome.DELIVERED and e]
        ids = [row.id for row in rows]
        actions.log_batch(
            destination_id=config.destination_id,
            owner_id=config.owner_id,
            started_at=started,
            duration_ms=duration_ms,
            outcome=outcome,
            rows=len(rows),
            written=delivered,
            rejected=rejected,
            retried=retried,
            statements=statements,
            first_delivery_id=min(ids),
            last_delivery_id=max(ids),
            error=failure.message if failure else (errors[0] if errors else ""),
        )
        now = time.monotonic()
        if now - self._pruned_at > actions.PRUNE_EVERY:
            self._pruned_at = now
            actions.prune_batches()


class Item(NamedTuple):
    """One event of a claimed row: the row's id and owner, and the event."""

    id: int
    owner_id: int
    payload: dict[str, Any]


def _unpack(rows: list[Claimed]) -> tuple[list[Item], list[tuple[int, int]]]:
    """The events of the claimed rows, in order, and each row's slice of them."""
    items: list[Item] = []
    spans: list[tuple[int, int]] = []
    for row in rows:
        start = len(items)
        payloads = row.payload if isinstance(row.payload, list) else [row.payload]
        items.extend(Item(row.id, row.owner_id, payload) for payload in payloads)
        spans.append((start, len(items)))
    return items, spans


def _within(rows: list[Claimed], limit: int) -> list[Claimed]:
    """The first rows whose events add up to at most `limit` (the first row in any case)."""
    total = 0
    for index, row in enumerate(rows):
        total += row.events
        if total > limit and index:
            return rows[:index]
    return rows


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, dict | list) else value


def _failing_column(
    renderer: mapping.Renderer,
    converters: list[Callable[[Any], Any]],
    payload: dict[str, Any],
    target: Target,
) -> str:
    for name, convert, value in zip(
        target.columns, converters, renderer.render(payload), strict=True
    ):
        try:
            convert(value)
        except (ValueError, TypeError, OverflowError):
            return name
    return "?"
