"""The outbox's database side: claim due rows, record what happened, reclaim lost leases.

Workers never hold a row by keeping a transaction open. A claim is one statement that flips due
`pending` rows to `sending`, counts the attempt and stamps a lease (token + expiry). On
PostgreSQL the rows are picked with `FOR UPDATE SKIP LOCKED`, so concurrent workers take disjoint
rows without waiting; SQLite serialises writers, so the same conditional UPDATE is atomic there.
Results are written back only where the lease token still matches: a worker that was presumed
dead (lease expired, row reclaimed and sent again) cannot overwrite the newer attempt. A killed
worker's rows come back through `reclaim_expired` once their lease runs out; the attempt it was
making counts, because a broker cannot tell us how often a message was redelivered.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from django.db import connection, transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from apps.core.pg import binary_cursor

from .models import Attempt, Delivery, Destination, Outcome, Status
from .retry import RetryPolicy

log = logging.getLogger(__name__)

ERROR_MAX = 300


@dataclass(slots=True)
class Claimed:
    """A delivery a worker holds the lease of. Carries everything needed to send it."""

    id: int
    owner_id: int
    destination_id: int
    message_id: str
    event_id: str
    event_type: str
    payload: Any  # the event; for a pack (events > 1, or a list), the list of its events
    attempt: int  # the number of this attempt, 1-based
    events: int = 1


@dataclass(slots=True)
class Result:
    """What one attempt came to, reported by a kind's transport."""

    delivery_id: int
    destination_id: int
    owner_id: int
    attempt: int
    started_at: datetime
    duration_ms: int
    outcome: str  # Outcome.DELIVERED / RETRY / FAILED / GONE
    status_code: int | None = None
    error: str = ""
    response: str = ""
    retry_after: float | None = None  # seconds, from the receiver's Retry-After
    # False when the kind keeps its own log of successes (database batches): no attempt row.
    logged: bool = True
    events: int = 1  # the row's events this outcome counts for (a pack's)


@dataclass(slots=True)
class Progress:
    """What a transport that claims for itself (database sinks) did, already recorded: one per
    batch, reported to the drain loop like a `Result`. `idle`: it has stopped pulling."""

    destination_id: int
    rows: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    stale: int = 0
    idle: bool = False


@dataclass
class Recorded:
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    stale: int = 0  # results whose lease had been taken over: ignored
    gone_destinations: set[int] = field(default_factory=set)


@contextmanager
def bookkeeping_without_fsync() -> Iterator[None]:
    """For the duration, this connection's commits do not wait for the WAL flush (PostgreSQL).

    Used around a drain loop, whose commits are only the workers' own bookkeeping (claims,
    results). If the database crashes, the last few of those commits may be lost: a lost claim
    leaves the row pending, a lost result leaves it leased until the lease expires, and either
    way the delivery is sent again with the same webhook-id — the at-least-once contract
    receivers already handle. Waiting for an fsync per batch (2–3 ms here) would stall the
    worker's sends for nothing. The outbox rows themselves are written durably, in the
    listener's transaction. Set per session (one round trip, not one per transaction) and
    reset afterwards, because the worker process also runs other apps' tasks.
    """
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO OFF")
    try:
        yield
    finally:
        if connection.connection is not None:
            with connection.cursor() as cursor:
                cursor.execute("SET synchronous_commit TO DEFAULT")


def _db_time(value: datetime) -> Any:
    # Raw SQL: let the backend format datetimes (SQLite stores text) as the ORM would.
    return connection.ops.adapt_datetimefield_value(value)


def _table() -> str:
    return connection.ops.quote_name(Delivery._meta.db_table)


def claim(
    destination_id: int,
    limit: int,
    token: str,
    lease_seconds: float,
    now: datetime | None = None,
    *,
    events: tuple[int, bool] | None = None,
) -> list[Claimed]:
    """Take up to `limit` due deliveries of one destination, oldest first.

    `events` = (budget, whole_first), for rows that carry several events (packs) on the lease
    path: only the first rows whose events add up to at most `budget`, and the first row
    even beyond it if `whole_first`. (On PostgreSQL packs are claimed with `lock_due`, whose
    caller cuts what it locked.)
    """
    if limit <= 0:
        return []
    now = now or timezone.now()
    table = _table()
    if events is not None and connection.vendor == "postgresql":
        raise ValueError("on PostgreSQL, claim packs with lock_due")
    if connection.vendor == "postgresql":
        # A CTE is evaluated once: the locked id set is exactly the updated one.
        sql = f"""
            WITH due AS (
                SELECT id FROM {table}
                WHERE destination_id = %b AND status = %b AND next_attempt_at <= %b
                ORDER BY next_attempt_at, id
                LIMIT %b
                FOR UPDATE SKIP LOCKED
            )
            UPDATE {table} AS d
            SET status = %b, attempts = d.attempts + 1, lease_token = %b,
                lease_expires_at = %b, last_attempt_at = %b
            FROM due WHERE d.id = due.id
            RETURNING d.id, d.owner_id, d.message_id, d.event_id, d.event_type, d.payload,
                      d.attempts, d.events
        """  # noqa: S608 - table name from model meta, values bound
    else:
        due = f"""
            SELECT id FROM {table}
            WHERE destination_id = %s AND status = %s AND next_attempt_at <= %s
            ORDER BY next_attempt_at, id
            LIMIT %s
        """  # noqa: S608
        if events is not None:
            # The due rows in order, with their running count of events: a prefix of them.
            due = f"""
                SELECT id FROM (
                    SELECT id,
                        sum(events) OVER (ORDER BY next_attempt_at, id) AS running,
                        row_number() OVER (ORDER BY next_attempt_at, id) AS n
                    FROM {table}
                    WHERE destination_id = %s AND status = %s AND next_attempt_at <= %s
                    ORDER BY next_attempt_at, id
                    LIMIT %s
                ) AS due
                WHERE running <= %s OR (n = 1 AND %s)
            """  # noqa: S608
        sql = f"""
            UPDATE {table}
            SET status = %s, attempts = attempts + 1, lease_token = %s,
                lease_expires_at = %s, last_attempt_at = %s
            WHERE id IN ({due})
            RETURNING id, owner_id, message_id, event_id, event_type, payload, attempts, events
        """  # noqa: S608
    lease_until = _db_time(now + timedelta(seconds=lease_seconds))
    select_params = [destination_id, str(Status.PENDING), _db_time(now), limit]
    if events is not None:
        select_params += [events[0], events[1]]
    update_params = [str(Status.SENDING), token, lease_until, _db_time(now)]
    if connection.vendor == "postgresql":
        with _server_cursor() as cursor:
            cursor.execute(sql, select_params + update_params)
            rows = cursor.fetchall()
    else:
        with connection.cursor() as cursor:
            cursor.execute(sql, update_params + select_params)
            rows = cursor.fetchall()
    claimed = [
        Claimed(
            id=row[0],
            owner_id=row[1],
            destination_id=destination_id,
            message_id=row[2],
            event_id=row[3],
            event_type=row[4],
            payload=orjson.loads(row[5]) if isinstance(row[5], str | bytes) else row[5],
            attempt=row[6],
            events=row[7],
        )
        for row in rows
    ]
    claimed.sort(key=lambda c: c.id)  # RETURNING has no order; send oldest first
    return claimed


def _server_cursor() -> AbstractContextManager[Any]:
    """The few hot statements of a batch bind on the server, in binary (`apps.core.pg`): a
    1,000-id array goes as one parameter, not quoted into the query text in Python."""
    return binary_cursor(connection, binary_results=True)


def lock_due(destination_id: int, limit: int, now: datetime | None = None) -> list[Claimed]:
    """Take up to `limit` due deliveries of one destination by locking them (PostgreSQL).

    The batch kinds' claim: no lease is written. The rows stay `pending` and locked (`FOR
    UPDATE SKIP LOCKED`, so other workers skip them) until the caller's transaction ends, which
    must record their outcome with `record(results, token=None, ...)` before it commits: one
    UPDATE per delivery instead of two (claim, then outcome), the larger part of a batch's cost
    in the platform's database. Only for work bounded in time (a database batch is bounded by
    its statement timeouts): the lock is held while the batch is written. If the worker dies,
    its transaction rolls back and the rows are due again at once, with the same event ids.
    """
    if limit <= 0:
        return []
    now = now or timezone.now()
    sql = f"""
        SELECT id, owner_id, message_id, event_id, event_type, payload, attempts + 1, events
        FROM {_table()}
        WHERE destination_id = %b AND status = %b AND next_attempt_at <= %b
        ORDER BY next_attempt_at, id
        LIMIT %b
        FOR UPDATE SKIP LOCKED
    """  # noqa: S608 - table name from model meta, values bound
    with _server_cursor() as cursor:
        cursor.execute(sql, [destination_id, str(Status.PENDING), now, limit])
        rows = cursor.fetchall()
    loads = orjson.loads
    return [
        Claimed(
            row[0], row[1], destination_id, row[2], row[3], row[4], loads(row[5]), row[6], row[7]
        )
        for row in rows
    ]


def split_out(
    row: Claimed,
    kept: list[Any],
    apart: list[dict[str, Any]],
    token: str | None,
    lease_seconds: float,
    now: datetime | None = None,
) -> list[Claimed]:
    """Take events out of a claimed pack (`outbox.write_outbox`): the row keeps `kept`, and
    each event of `apart` becomes a row of its own, claimed like the pack (leased by `token`,
    or, with None, new in the caller's transaction, which holds the pack locked), so that
    `record` gives each its outcome: a dead letter to replay alone, or a retry."""
    from .outbox import message_id

    now = now or timezone.now()
    Delivery.objects.filter(pk=row.id).update(payload=kept, events=len(kept))
    twins = []
    for payload in apart:
        event_id = str(payload.get("id") or row.event_id)[:64]
        twins.append(
            Delivery(
                owner_id=row.owner_id,
                destination_id=row.destination_id,
                event_id=event_id,
                event_type=str(payload.get("type") or row.event_type)[:32],
                device=str((payload.get("device") or {}).get("id") or "")[:63],
                message_id=message_id(row.destination_id, event_id),
                payload=payload,
                events=1,
                created_at=now,
                next_attempt_at=now,
                # Leased: as claimed, attempt counted; locked: `record` counts the attempt.
                status=Status.SENDING if token else Status.PENDING,
                attempts=row.attempt if token else row.attempt - 1,
                lease_token=token,
                lease_expires_at=now + timedelta(seconds=lease_seconds) if token else None,
                last_attempt_at=now if token else None,
            )
        )
    created = Delivery.objects.bulk_create(twins)
    return [
        Claimed(
            d.id, row.owner_id, row.destination_id, d.message_id, d.event_id, d.event_type,
            d.payload, row.attempt,
        )
        for d in created
    ]  # fmt: skip


def reclaim_expired(now: datetime | None = None) -> int:
    """Put rows whose worker vanished (lease expired) back in line, and log the lost attempt."""
    now = now or timezone.now()
    table = _table()
    sql = f"""
        UPDATE {table}
        SET status = %s, next_attempt_at = %s, lease_token = NULL, lease_expires_at = NULL,
            last_error = %s
        WHERE status = %s AND lease_expires_at < %s
        RETURNING id, owner_id, destination_id, attempts, last_attempt_at
    """  # noqa: S608
    message = "The worker sending this was lost; it will be sent again."
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                sql, [Status.PENDING, _db_time(now), message, Status.SENDING, _db_time(now)]
            )
            rows = cursor.fetchall()
        Attempt.objects.bulk_create(
            Attempt(
                owner_id=owner_id,
                destination_id=destination_id,
                delivery_id=delivery_id,
                number=attempts,
                started_at=_parse_time(started) or now,
                outcome=Outcome.INTERRUPTED,
                error=message,
            )
            for delivery_id, owner_id, destination_id, attempts, started in rows
        )
    if rows:
        log.warning("reclaimed %d deliveries whose lease expired", len(rows))
    return len(rows)


def _parse_time(value: Any) -> datetime | None:
    # RETURNING bypasses the ORM's conversions: SQLite hands back naive UTC (or text).
    if value is None:
        return None
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_UPDATE_CHUNK = 500


def _update_leased(ids: list[int], token: str | None, values: dict[str, Any]) -> list[int]:
    """Set the outcome of rows still leased by `token`; returns the ids that were.

    One UPDATE … RETURNING with the lease condition in its WHERE clause: a row that was
    reclaimed meanwhile (someone else's now) is simply not matched. On PostgreSQL the ids go as
    one array parameter, so the statement text (and the driver's parse of it) never changes.
    With `token=None` the rows are held by this transaction's locks (`lock_due`): no lease to
    check, and the attempt is counted here rather than at the claim.
    """
    if token is None:
        return _update_locked(ids, values)
    table = _table()
    delivered_at, next_at = values.get("delivered_at"), values.get("next_attempt_at")
    head = [
        values["status"],
        values["last_status_code"],
        values["last_error"],
        None if delivered_at is None else _db_time(delivered_at),
        None if next_at is None else _db_time(next_at),
    ]
    setter = f"""
        UPDATE {table}
        SET status = %s, last_status_code = %s, last_error = %s, lease_token = NULL,
            lease_expires_at = NULL, delivered_at = COALESCE(%s, delivered_at),
            next_attempt_at = COALESCE(%s, next_attempt_at)
    """  # noqa: S608 - table name from model meta, values bound
    done: list[int] = []
    if connection.vendor == "postgresql":
        with _server_cursor() as cursor:
            cursor.execute(
                setter.replace("%s", "%b")
                + "WHERE id = ANY(%b) AND lease_token = %b AND status = %b RETURNING id",
                [str(head[0]), *head[1:], ids, token, str(Status.SENDING)],
            )
            return [row[0] for row in cursor.fetchall()]
    with connection.cursor() as cursor:
        for start in range(0, len(ids), _UPDATE_CHUNK):
            chunk = ids[start : start + _UPDATE_CHUNK]
            marks = ", ".join(["%s"] * len(chunk))
            cursor.execute(
                setter + f"WHERE id IN ({marks}) AND lease_token = %s AND status = %s RETURNING id",
                [*head, *chunk, token, Status.SENDING],
            )
            done.extend(row[0] for row in cursor.fetchall())
    return done


def _update_locked(ids: list[int], values: dict[str, Any]) -> list[int]:
    """`_update_leased` for rows this transaction holds locked (PostgreSQL only).

    The locks are the condition: no `status` test in the WHERE clause. With one, PostgreSQL may
    (without fresh statistics, e.g. just after a burst) combine the pending rows' partial index
    with the primary key — reading the whole backlog's index for every batch."""
    delivered_at, next_at = values.get("delivered_at"), values.get("next_attempt_at")
    sql = f"""
        UPDATE {_table()}
        SET status = %b, last_status_code = %b, last_error = %b, attempts = attempts + 1,
            last_attempt_at = %b, delivered_at = COALESCE(%b, delivered_at),
            next_attempt_at = COALESCE(%b, next_attempt_at)
        WHERE id = ANY(%b)
        RETURNING id
    """  # noqa: S608 - table name from model meta, values bound
    with _server_cursor() as cursor:
        cursor.execute(
            sql,
            [
                str(values["status"]),
                values["last_status_code"],
                values["last_error"],
                values["attempted_at"],
                delivered_at,
                next_at,
                ids,
            ],
        )
        return [row[0] for row in cursor.fetchall()]


def record(
    results: Iterable[Result], token: str | None, policies: dict[int, RetryPolicy]
) -> Recorded:
    """Write a batch of attempt results: delivery states, the attempt log, destination figures.

    One transaction, a handful of statements per batch whatever its size: rows are grouped by
    the values they get (status code, error, retry time rounded to the second). `token` is the
    lease the rows were claimed under (`claim`), or None for rows this transaction holds
    locked (`lock_due`).
    """
    now = timezone.now()
    summary = Recorded()
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        if r.outcome == Outcome.DELIVERED:
            key: tuple = (Status.DELIVERED, r.status_code, "", None)
        elif r.outcome == Outcome.GONE:
            # Back in line, so that re-enabling the destination delivers it.
            key = (Status.PENDING, r.status_code, r.error, now)
        else:
            delay = None
            if r.outcome == Outcome.RETRY:
                policy = policies.get(r.destination_id) or RetryPolicy()
                delay = policy.delay_after(r.attempt, r.retry_after)
            if delay is None:
                if r.outcome == Outcome.RETRY:
                    r.outcome = Outcome.FAILED
                    r.error = f"{r.error} (gave up after {r.attempt} attempts)"[:ERROR_MAX]
                key = (Status.FAILED, r.status_code, r.error, None)
            else:
                # Whole seconds, rounded up (never earlier than asked), so that a batch's
                # retries share a few UPDATEs instead of one each.
                due = (now + timedelta(seconds=math.ceil(delay))).replace(microsecond=0)
                due += timedelta(seconds=1) if now.microsecond else timedelta(0)
                key = (Status.PENDING, r.status_code, r.error, due)
        groups[key].append(r)

    mine: set[int] = set()
    with transaction.atomic():
        for (status, code, error, due), members in groups.items():
            values: dict[str, Any] = {
                "status": status,
                "last_status_code": code,
                "last_error": error[:ERROR_MAX],
                "delivered_at": now if status == Status.DELIVERED else None,
                "next_attempt_at": due,
                "attempted_at": min(r.started_at for r in members),
            }
            mine.update(_update_leased([r.delivery_id for r in members], token, values))

        kept = [r for members in groups.values() for r in members if r.delivery_id in mine]
        summary.stale = sum(len(m) for m in groups.values()) - len(kept)
        _insert_attempts([r for r in kept if r.logged])
        _update_destinations(kept, now, summary)
    return summary


_ATTEMPT_COLUMNS = (
    "owner_id",
    "destination_id",
    "delivery_id",
    "number",
    "started_at",
    "duration_ms",
    "outcome",
    "status_code",
    "error",
    "response",
)


_UNNEST_TYPES = (
    "%b::bigint[], %b::bigint[], %b::bigint[], %b::smallint[], %b::timestamptz[], "
    "%b::integer[], %b::text[], %b::smallint[], %b::text[], %b::text[]"
)


def _insert_attempts(results: list[Result]) -> None:
    """The attempt log in one statement of constant text (arrays on PostgreSQL): the ORM's
    bulk_create spends more CPU building objects and SQL than the database spends storing
    them, at thousands of rows a second."""
    if not results:
        return
    table = connection.ops.quote_name(Attempt._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(c) for c in _ATTEMPT_COLUMNS)
    marks = ", ".join(["%s"] * len(_ATTEMPT_COLUMNS))
    rows = [
        (
            r.owner_id,
            r.destination_id,
            r.delivery_id,
            r.attempt,
            _db_time(r.started_at),
            r.duration_ms,
            r.outcome,
            r.status_code,
            r.error[:ERROR_MAX],
            r.response[:512],
        )
        for r in results
    ]
    if connection.vendor == "postgresql":
        # One statement of ten array parameters, whatever the number of rows.
        arrays = [list(column) for column in zip(*rows, strict=True)]
        arrays[6] = [str(outcome) for outcome in arrays[6]]  # plain str for the binary dumper
        with _server_cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({columns}) SELECT * FROM unnest({_UNNEST_TYPES})",  # noqa: S608
                arrays,
            )
        return
    with connection.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)  # noqa: S608


def _update_destinations(kept: list[Result], now: datetime, summary: Recorded) -> None:
    by_destination: dict[int, list[Result]] = defaultdict(list)
    for r in kept:
        by_destination[r.destination_id].append(r)
    for destination_id, results in by_destination.items():
        # Events, not rows: a pack counts for its events.
        ok = sum(r.events for r in results if r.outcome == Outcome.DELIVERED)
        retried = sum(r.events for r in results if r.outcome == Outcome.RETRY)
        failed = sum(r.events for r in results if r.outcome == Outcome.FAILED)
        summary.delivered += ok
        summary.retried += retried
        summary.failed += failed
        values: dict[str, Any] = {
            "delivered_count": F("delivered_count") + ok,
            "retried_count": F("retried_count") + retried,
            "failed_count": F("failed_count") + failed,
            "attempt_count": F("attempt_count") + len(results),
        }
        errors = [r for r in results if r.outcome != Outcome.DELIVERED]
        if ok:
            values["last_success_at"] = now
            values["failing_since"] = None
            values["alerted_at"] = None
        elif errors:
            values["failing_since"] = Coalesce(F("failing_since"), Value(now))
        if errors:
            last = errors[-1]
            code = f"HTTP {last.status_code}: " if last.status_code else ""
            values["last_error"] = f"{code}{last.error}"[:ERROR_MAX]
            values["last_error_at"] = now
        Destination.objects.filter(pk=destination_id).update(**values)
        if any(r.outcome == Outcome.GONE for r in results):
            summary.gone_destinations.add(destination_id)
