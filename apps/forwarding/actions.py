"""State changes of Data Delivery. Admin, commands, tasks and the pipeline call these; nothing
else changes destinations' state or replays deliveries.

Every function takes objects or querysets that the caller has already scoped to the acting user
or owner (`apps.owners.scoping`); tasks pass an owner id along with every object id.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from . import claims, kinds, outbox
from .kinds import TestResult
from .models import AlertKind, Attempt, Delivery, DeliveryAlert, Destination, Status
from .webhook import signing
from .webhook.models import WebhookDestination

log = logging.getLogger(__name__)

ROTATION_GRACE = timedelta(hours=24)
PRUNE_EVERY = 3600  # seconds
PRUNE_CHUNK = 5000


def _kick() -> None:
    from .tasks import kick

    kick()


# --- destinations -------------------------------------------------------------------------------


def destination_saved(destination: Destination, *, test: bool = True) -> None:
    """After a destination was created or edited: new routes, and a Test Connection."""
    outbox.forget_routes()
    if test:
        from .tasks import test_destination as task

        owner_id, pk = destination.owner_id, destination.pk
        # robust: a broker hiccup must not turn a saved destination into an error page.
        transaction.on_commit(lambda: task.delay(owner_id, pk), robust=True)


@transaction.atomic
def enable_destination(destination: Destination) -> int:
    """Re-enable, and make its whole backlog due now, oldest first. Returns the backlog size."""
    now = timezone.now()
    Destination.objects.filter(pk=destination.pk).update(
        enabled=True, disabled_reason="", disabled_at=None, failing_since=None, alerted_at=None
    )
    # One due time for all: the claim's tie-break on id then delivers in event order.
    pending = Delivery.objects.filter(destination=destination, status=Status.PENDING)
    backlog = pending.events()
    pending.update(next_attempt_at=now)
    DeliveryAlert.objects.filter(destination=destination, resolved_at=None).update(resolved_at=now)
    destination.enabled = True
    destination.disabled_reason = ""
    outbox.forget_routes()
    transaction.on_commit(_kick, robust=True)  # else the next sweep kicks
    return backlog


@transaction.atomic
def disable_destination(destination: Destination, reason: str = "", *, alert: bool = False) -> None:
    now = timezone.now()
    changed = Destination.objects.filter(pk=destination.pk, enabled=True).update(
        enabled=False, disabled_reason=reason[:300], disabled_at=now
    )
    destination.enabled = False
    destination.disabled_reason = reason[:300]
    outbox.forget_routes()
    if changed and alert:
        _alert(destination, AlertKind.DISABLED, f"{destination.name} was disabled: {reason}")


def destination_gone(destination_id: int) -> None:
    """The receiver answered 410 Gone: stop sending until the owner re-enables."""
    destination = Destination.objects.filter(pk=destination_id).first()
    if destination is not None:
        disable_destination(destination, "The receiver answered 410 Gone.", alert=True)


def _alert(destination: Destination, kind: str, message: str) -> None:
    log.warning(
        "delivery alert owner=%s destination=%s: %s", destination.owner_id, destination.pk, message
    )
    DeliveryAlert.objects.create(
        owner_id=destination.owner_id, destination=destination, kind=kind, message=message[:300]
    )


@transaction.atomic
def rotate_secret(destination: WebhookDestination, grace: timedelta = ROTATION_GRACE) -> str:
    """A new signing secret; the old one keeps signing too until `grace` has passed.

    Returns the new secret so that it can be shown to the owner once."""
    new = signing.generate_secret()
    destination.previous_secret = destination.secret.reveal()
    destination.previous_secret_expires_at = timezone.now() + grace
    destination.secret = new
    destination.save()
    outbox.forget_routes()
    return new


def test_destination(destination: Destination) -> TestResult:
    """Test Connection: send a signed ping (or the kind's equivalent); store and return the
    result. Bounded by the destination's timeout."""
    child = kinds.KINDS[destination.kind].model.objects.get(pk=destination.pk)
    try:
        result = kinds.transport(destination.kind).test(child)
    except Exception:
        log.exception("test of destination %s failed", destination.pk)
        result = TestResult(False, "The test could not be run")
    Destination.objects.filter(pk=destination.pk).update(
        last_test_at=timezone.now(),
        last_test_ok=result.ok,
        last_test_status=result.status_code,
        last_test_ms=result.duration_ms,
        last_test_message=result.message[:300],
    )
    return result


# --- replay -------------------------------------------------------------------------------------

REPLAYABLE = (Status.FAILED, Status.DELIVERED)


@transaction.atomic
def replay_deliveries(deliveries: QuerySet[Delivery]) -> int:
    """Send these deliveries again: same webhook-id, a fresh retry budget. Rows still pending or
    being sent are left alone (they are on their way). Returns how many events were queued (a
    database destination's row carries a batch of them)."""
    now = timezone.now()
    replayable = deliveries.filter(status__in=REPLAYABLE)
    events = replayable.events()
    count = replayable.update(
        status=Status.PENDING,
        attempts=0,
        next_attempt_at=now,
        replays=F("replays") + 1,
        lease_token=None,
        lease_expires_at=None,
        last_error="",
    )
    if count:
        transaction.on_commit(_kick, robust=True)  # else the next sweep kicks
    return events if count else 0


def replay_range(
    deliveries: QuerySet[Delivery],
    since: datetime | None = None,
    until: datetime | None = None,
    include_delivered: bool = False,
) -> int:
    """Replay the dead letters (and, if asked, the delivered ones) created in [since, until)."""
    selected = deliveries
    if since is not None:
        selected = selected.filter(created_at__gte=since)
    if until is not None:
        selected = selected.filter(created_at__lt=until)
    if not include_delivered:
        selected = selected.filter(status=Status.FAILED)
    return replay_deliveries(selected)


# --- housekeeping (the periodic sweep) ----------------------------------------------------------


def check_failing(now: datetime | None = None) -> None:
    """Alert owners of destinations failing for a while; disable those failing for long."""
    now = now or timezone.now()
    alert_after = now - timedelta(minutes=settings.DELIVERY_ALERT_AFTER_MINUTES)
    disable_after = now - timedelta(hours=settings.DELIVERY_DISABLE_AFTER_HOURS)
    failing = Destination.objects.filter(enabled=True, failing_since__isnull=False)
    for destination in failing.filter(failing_since__lt=disable_after):
        hours = settings.DELIVERY_DISABLE_AFTER_HOURS
        disable_destination(
            destination,
            f"Every delivery failed for {hours:g} hours (last error: {destination.last_error}).",
            alert=True,
        )
    for destination in failing.filter(failing_since__lt=alert_after, alerted_at=None):
        with transaction.atomic():
            if Destination.objects.filter(pk=destination.pk, alerted_at=None).update(
                alerted_at=now
            ):
                _alert(
                    destination,
                    AlertKind.FAILING,
                    f"{destination.name} keeps failing since "
                    f"{destination.failing_since:%Y-%m-%d %H:%M} UTC: {destination.last_error}",
                )


def prune(now: datetime | None = None, budget: int = 20 * PRUNE_CHUNK) -> int:
    """Delete delivered rows and attempts past retention, dead letters past theirs. Chunked,
    so that a long-neglected table does not turn into one huge transaction."""
    now = now or timezone.now()
    kept = now - timedelta(days=settings.DELIVERY_RETENTION_DAYS)
    dead_kept = now - timedelta(days=settings.DELIVERY_DEAD_RETENTION_DAYS)
    old = Q(status=Status.DELIVERED, created_at__lt=kept) | Q(
        status=Status.FAILED, created_at__lt=dead_kept
    )
    deleted = 0
    while deleted < budget:
        ids = list(Delivery.objects.filter(old).values_list("id", flat=True)[:PRUNE_CHUNK])
        if not ids:
            break
        with transaction.atomic():
            Attempt.objects.filter(delivery_id__in=ids).delete()
            deleted += Delivery.objects.filter(id__in=ids).delete()[0]
    Attempt.objects.filter(started_at__lt=dead_kept).delete()
    return deleted


def remove_orphans() -> int:
    """Delete outbox rows of destinations that no longer exist; returns how many.

    The outbox has no database-level foreign keys (`Delivery`), so a listener whose route cache
    still held a just-deleted destination may have written rows for it. They are still
    pending (nothing claims a destination that does not exist), so the destinations with
    pending rows are listed by skipping through the pending rows' index, one probe per
    destination (a recursive query), not by reading the backlog.
    """
    table = connection.ops.quote_name(Delivery._meta.db_table)
    destinations = connection.ops.quote_name(Destination._meta.db_table)
    sql = f"""
        WITH RECURSIVE pending(id) AS (
            SELECT (SELECT destination_id FROM {table} WHERE status = %s
                    ORDER BY destination_id LIMIT 1)
            UNION ALL
            SELECT (SELECT destination_id FROM {table} WHERE status = %s AND destination_id > p.id
                    ORDER BY destination_id LIMIT 1)
            FROM pending p WHERE p.id IS NOT NULL
        )
        SELECT id FROM pending
        WHERE id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {destinations} d WHERE d.id = pending.id)
    """  # noqa: S608 - table names from model meta, values bound
    with connection.cursor() as cursor:
        cursor.execute(sql, [Status.PENDING, Status.PENDING])
        gone = [row[0] for row in cursor.fetchall()]
    if not gone:
        return 0
    deleted = Delivery.objects.filter(destination_id__in=gone).delete()[0]
    log.info("removed %d outbox rows of deleted destinations %s", deleted, gone)
    return deleted


def sweep() -> None:
    """The periodic sweep: lost leases back in line, failing destinations, outbox rows of
    deleted destinations, retention, and a drain task when something is due that no running
    drain has taken."""
    claims.reclaim_expired()
    check_failing()
    remove_orphans()
    if cache.add("forwarding:prune", 1, timeout=PRUNE_EVERY):
        prune()
    from .pipeline import due_destinations

    if due_destinations():
        _kick()
