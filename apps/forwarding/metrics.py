"""Delivery metrics for `/metrics` (apps.core.metrics collects them at scrape time from the
database, so that every worker process's work is counted once)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from django.db.models import Count, Min, Q, QuerySet, Sum
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from apps.core.metrics import register_collector

from .kinds import KINDS
from .models import Attempt, Delivery, Destination, Outcome, Status
from .stats import percentile

LATENCY_WINDOW = timedelta(minutes=5)
LATENCY_SAMPLE = 5000


def oldest_due(now: datetime) -> dict[str, datetime]:
    """Per kind, since when the oldest due delivery of an enabled destination has waited."""
    return {
        row["destination__kind"]: row["oldest"]
        for row in Delivery.objects.filter(
            status=Status.PENDING, next_attempt_at__lte=now, destination__enabled=True
        )
        .order_by()
        .values("destination__kind")
        .annotate(oldest=Min("next_attempt_at"))
    }


@register_collector("delivery")
def delivery_metrics() -> Iterator[Metric]:
    now = timezone.now()
    kinds = list(KINDS)

    totals = CounterMetricFamily(
        "iot_delivery_deliveries",
        "Deliveries finished or retried, by destination kind and outcome (totals of existing "
        "destinations).",
        labels=["kind", "outcome"],
    )
    sums = {
        row["kind"]: row
        for row in Destination.objects.order_by()
        .values("kind")
        .annotate(
            delivered=Sum("delivered_count"),
            failed=Sum("failed_count"),
            retried=Sum("retried_count"),
            attempts=Sum("attempt_count"),
        )
    }
    attempts = CounterMetricFamily(
        "iot_delivery_attempts", "Delivery attempts, by destination kind.", labels=["kind"]
    )
    for kind in kinds:
        row = sums.get(kind, {})
        for outcome in ("delivered", "failed", "retried"):
            totals.add_metric([kind, outcome], row.get(outcome) or 0)
        attempts.add_metric([kind], row.get("attempts") or 0)
    yield totals
    yield attempts

    backlog = GaugeMetricFamily(
        "iot_delivery_backlog",
        "Deliveries waiting or being sent, by destination kind and status.",
        labels=["kind", "status"],
    )
    counts = {
        (row["destination__kind"], row["status"]): row["n"]
        for row in Delivery.objects.filter(status__in=[Status.PENDING, Status.SENDING])
        .order_by()
        .values("destination__kind", "status")
        .annotate(n=Sum("events"))  # events: a database destination's row carries several
    }
    for kind in kinds:
        for status in (Status.PENDING, Status.SENDING):
            backlog.add_metric([kind, status], counts.get((kind, status), 0))
    yield backlog

    lag = GaugeMetricFamily(
        "iot_delivery_oldest_due_seconds",
        "How long the oldest due delivery of an enabled destination has waited (0: none).",
        labels=["kind"],
    )
    oldest = oldest_due(now)
    for kind in kinds:
        when = oldest.get(kind)
        lag.add_metric([kind], (now - when).total_seconds() if when else 0)
    yield lag

    latency = GaugeMetricFamily(
        "iot_delivery_latency_seconds",
        "Duration of successful attempts in the last 5 minutes, by kind (quantiles).",
        labels=["kind", "quantile"],
    )
    for kind in kinds:
        if kind == "database":  # logs its written batches, not an attempt per row
            from .database.models import BatchOutcome, DatabaseBatch

            recent: QuerySet = DatabaseBatch.objects.filter(
                started_at__gte=now - LATENCY_WINDOW,
                outcome__in=[BatchOutcome.WRITTEN, BatchOutcome.PARTIAL],
            )
        else:
            recent = Attempt.objects.filter(
                started_at__gte=now - LATENCY_WINDOW,
                outcome=Outcome.DELIVERED,
                destination__kind=kind,
            )
        durations = sorted(
            recent.order_by("-id").values_list("duration_ms", flat=True)[:LATENCY_SAMPLE]
        )
        for q in (0.5, 0.95, 0.99):
            value = percentile(durations, q * 100)
            latency.add_metric([kind, str(q)], (value or 0) / 1000)
    yield latency

    states = GaugeMetricFamily(
        "iot_delivery_destinations",
        "Destinations by kind and state (enabled, failing, disabled).",
        labels=["kind", "state"],
    )
    rows = (
        Destination.objects.order_by()
        .annotate(failing=Q(failing_since__isnull=False))
        .values("kind", "enabled", "failing")
        .annotate(n=Count("id"))
    )
    found: dict[tuple[str, str], int] = {}
    for row in rows:
        if not row["enabled"]:
            state = "disabled"
        elif row["failing"]:
            state = "failing"
        else:
            state = "enabled"
        found[(row["kind"], state)] = found.get((row["kind"], state), 0) + row["n"]
    for kind in kinds:
        for state in ("enabled", "failing", "disabled"):
            states.add_metric([kind, state], found.get((kind, state), 0))
    yield states
