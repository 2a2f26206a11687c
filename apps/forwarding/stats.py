"""Monitoring figures per destination: what the Data Delivery tab and the admin show.

Totals come from the running counters on the destination (the outbox may hold millions of
rows); backlog is counted on the partial "due" index; latency percentiles come from the newest
successful attempts (index on destination, -id).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from django.db.models import Sum

from .models import Attempt, Delivery, Destination, Outcome, Status

LATENCY_SAMPLE = 1000


@dataclass(frozen=True)
class Figures:
    backlog: int  # waiting (pending) + being sent
    sending: int
    p50_ms: int | None
    p95_ms: int | None

    @staticmethod
    def empty() -> Figures:
        return Figures(0, 0, None, None)


def percentile(ordered: list[int], p: float) -> int | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def latency(destination_id: int, sample: int = LATENCY_SAMPLE) -> tuple[int | None, int | None]:
    durations = sorted(
        Attempt.objects.filter(destination_id=destination_id, outcome=Outcome.DELIVERED)
        .order_by("-id")
        .values_list("duration_ms", flat=True)[:sample]
    )
    return percentile(durations, 50), percentile(durations, 95)


def batch_latency(
    destination_id: int, sample: int = LATENCY_SAMPLE
) -> tuple[int | None, int | None]:
    """Database destinations log batches, not attempts: how long written batches took."""
    from .database.models import BatchOutcome, DatabaseBatch

    durations = sorted(
        DatabaseBatch.objects.filter(
            destination_id=destination_id,
            outcome__in=[BatchOutcome.WRITTEN, BatchOutcome.PARTIAL],
        )
        .order_by("-id")
        .values_list("duration_ms", flat=True)[:sample]
    )
    return percentile(durations, 50), percentile(durations, 95)


def figures(destinations: Iterable[Destination]) -> dict[int, Figures]:
    destinations = list(destinations)
    kinds = {d.pk: d.kind for d in destinations}
    ids = [d.pk for d in destinations]
    if not ids:
        return {}
    counts: dict[tuple[int, str], int] = {
        (row["destination_id"], row["status"]): row["n"]
        for row in Delivery.objects.filter(
            destination_id__in=ids, status__in=[Status.PENDING, Status.SENDING]
        )
        .order_by()
        .values("destination_id", "status")
        .annotate(n=Sum("events"))  # events: a database destination's row carries several
    }
    result = {}
    for pk in ids:
        pending = counts.get((pk, Status.PENDING), 0)
        sending = counts.get((pk, Status.SENDING), 0)
        p50, p95 = batch_latency(pk) if kinds[pk] == "database" else latency(pk)
        result[pk] = Figures(pending + sending, sending, p50, p95)
    return result
