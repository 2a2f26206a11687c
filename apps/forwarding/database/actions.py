"""State changes of database destinations: health after each batch, the per-batch log, owner
alerts, edits, and the CREATE TABLE the owner may ask the platform to run.

Health is a back-off at the destination level, on top of the rows' own retry schedule: a batch
that fails for anything but its content pauses the destination for one step of its retry policy
(`paused_until`), then exactly one probe row is tried (`claim_probe` makes that one across worker
processes); success resumes full batches. So a wrong password or a dropped table costs one login
attempt per back-off step, not one per batch — no retry storm against the owner's server.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from ..models import AlertKind, DeliveryAlert, Destination
from ..retry import RetryPolicy
from .base import ErrorClass, SinkError
from .models import BatchOutcome, DatabaseBatch, DatabaseDestination

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0  # seconds between retention passes over the batch log, per process


def pause_for(policy: RetryPolicy, streak: int) -> float:
    """Seconds to pause after `streak` consecutive failed batches: the retry policy's schedule,
    continued at its cap once its attempts are used up (the destination itself never gives up;
    its rows do, and the sweep disables a destination failing for days)."""
    delay = RetryPolicy(
        max_attempts=10**6,
        initial_delay=policy.initial_delay,
        backoff_factor=policy.backoff_factor,
        max_delay=policy.max_delay,
    ).delay_after(streak)
    return float(delay or policy.max_delay)


def claim_probe(destination_id: int, lease_seconds: float, now: datetime | None = None) -> bool:
    """Take the one probe of a failing destination whose pause is over (atomic across
    processes: whoever moves `paused_until` forward owns the probe)."""
    now = now or timezone.now()
    return bool(
        DatabaseDestination.objects.filter(pk=destination_id, failure_streak__gt=0)
        .filter(Q(paused_until__isnull=True) | Q(paused_until__lte=now))
        .update(paused_until=now + timedelta(seconds=lease_seconds))
    )


def batch_succeeded(destination_id: int) -> None:
    """Clear a failing or in-error state (cheap no-op when healthy)."""
    DatabaseDestination.objects.filter(pk=destination_id).filter(
        Q(failure_streak__gt=0) | ~Q(error_reason="") | Q(paused_until__isnull=False)
    ).update(failure_streak=0, paused_until=None, error_reason="", error_since=None)


def batch_failed(
    destination_id: int, error: SinkError, policy: RetryPolicy, now: datetime | None = None
) -> datetime:
    """Pause the destination for the next back-off step; for a destination-class error also
    put it in error with the reason and alert the owner once. Returns the end of the pause."""
    now = now or timezone.now()
    with transaction.atomic():
        destination = (
            DatabaseDestination.objects.select_for_update()
            .only("pk", "owner_id", "name", "failure_streak", "error_reason")
            .filter(pk=destination_id)
            .first()
        )
        if destination is None:
            return now
        streak = destination.failure_streak + 1
        until = now + timedelta(seconds=pause_for(policy, streak))
        values: dict = {"failure_streak": streak, "paused_until": until}
        entering_error = error.kind is ErrorClass.DESTINATION and not destination.error_reason
        if error.kind is ErrorClass.DESTINATION:
            values["error_reason"] = error.message
            if entering_error:
                values["error_since"] = now
        DatabaseDestination.objects.filter(pk=destination_id).update(**values)
        if entering_error:
            message = f"{destination.name} is in error: {error.message}"
            log.warning(
                "delivery alert owner=%s destination=%s: %s",
                destination.owner_id,
                destination_id,
                message,
            )
            DeliveryAlert.objects.create(
                owner_id=destination.owner_id,
                destination_id=destination_id,
                kind=AlertKind.FAILING,
                message=message[:300],
            )
            # The sweep's "keeps failing" alert would say the same an hour later.
            Destination.objects.filter(pk=destination_id).update(alerted_at=now)
    return until


def log_batch(
    *,
    destination_id: int,
    owner_id: int,
    started_at: datetime,
    duration_ms: int,
    outcome: str,
    rows: int,
    written: int = 0,
    rejected: int = 0,
    retried: int = 0,
    statements: int = 0,
    first_delivery_id: int | None = None,
    last_delivery_id: int | None = None,
    error: str = "",
) -> None:
    DatabaseBatch.objects.create(
        owner_id=owner_id,
        destination_id=destination_id,
        started_at=started_at,
        duration_ms=duration_ms,
        outcome=outcome,
        rows=rows,
        written=written,
        rejected=rejected,
        retried=retried,
        statements=statements,
        first_delivery_id=first_delivery_id,
        last_delivery_id=last_delivery_id,
        error=error[:300],
    )
    values: dict = {"batch_count": F("batch_count") + 1}
    if outcome in (BatchOutcome.WRITTEN, BatchOutcome.PARTIAL):
        values["last_batch_at"] = timezone.now()
    DatabaseDestination.objects.filter(pk=destination_id).update(**values)


def prune_batches(now: datetime | None = None) -> int:
    """Batch log retention: as long as delivered rows are kept."""
    now = now or timezone.now()
    kept = now - timedelta(days=settings.DELIVERY_RETENTION_DAYS)
    return DatabaseBatch.objects.filter(started_at__lt=kept).delete()[0]


@transaction.atomic
def destination_changed(destination: DatabaseDestination, *, test: bool = True) -> None:
    """After the owner created or edited a database destination: a fresh start (the edit may
    be the fix), new routes, and a Test Connection."""
    from .. import actions

    DatabaseDestination.objects.filter(pk=destination.pk).update(
        failure_streak=0, paused_until=None, error_reason="", error_since=None
    )
    destination.failure_streak = 0
    destination.paused_until = None
    destination.error_reason = ""
    actions.destination_saved(destination, test=test)


def create_table(destination: DatabaseDestination) -> tuple[bool, str]:
    """Run the suggested CREATE TABLE in the owner's database — only ever because the owner
    ticked the option for it. Returns (done, message for the owner)."""
    from . import ddl, mysql, postgres

    statement = ddl.suggest(destination)
    engine = postgres if destination.engine == "postgres" else mysql
    try:
        conn = engine.connect(destination.connection_settings())
    except SinkError as exc:
        return False, exc.message
    try:
        engine.execute_ddl(conn, statement)
    except Exception as exc:
        error = engine.classify(exc)
        log.info("create table for destination %s: %r", destination.pk, exc)
        return False, f"The table could not be created: {error.message}"
    finally:
        conn.close()
    log.info("destination %s: created table %s", destination.pk, destination.table)
    return True, f"Table {destination.table} is in place (created unless it existed)."
