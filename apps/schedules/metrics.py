"""Schedule metrics for `/metrics` (collected at scrape time from the database, see
apps.core.metrics): is the runner keeping up, and how late do commands go out."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily, Metric

from apps.core.metrics import register_collector

from .models import RunStatus, Schedule, ScheduleRun

WINDOW = timedelta(hours=1)
LATENESS_SAMPLE = 10_000  # the newest executed runs of the window
QUANTILES = (("0.5", 0.5), ("0.95", 0.95), ("1", 1.0))


def most_overdue(now: datetime) -> datetime | None:
    """When the most overdue enabled schedule fell due (the (enabled, next_run_at) index). Beat
    asks the runner every few seconds and runs are prepared ahead, so anything beyond a few
    seconds means beat or the workers are not running (or cannot keep up)."""
    return Schedule.objects.filter(enabled=True, next_run_at__lte=now).aggregate(
        oldest=Min("next_run_at")
    )["oldest"]


@register_collector("schedules")
def schedule_metrics() -> Iterator[Metric]:
    now = timezone.now()
    since = now - WINDOW

    oldest = most_overdue(now)
    yield GaugeMetricFamily(
        "iot_schedule_overdue_seconds",
        "How long the most overdue enabled schedule has been due; 0 when none is.",
        value=(now - oldest).total_seconds() if oldest else 0.0,
    )
    yield GaugeMetricFamily(
        "iot_schedules_enabled",
        "Enabled schedules.",
        value=Schedule.objects.filter(enabled=True).count(),
    )

    # The (status, planned_at) index, every status at once.
    recent = ScheduleRun.objects.filter(status__in=RunStatus.values, planned_at__gte=since)
    counts = dict(recent.order_by().values_list("status").annotate(n=Count("id")))
    runs = GaugeMetricFamily(
        "iot_schedule_runs_last_hour",
        "Schedule runs planned in the last hour, by status (zeros included).",
        labels=["status"],
    )
    for status in RunStatus.values:
        runs.add_metric([status], counts.get(status, 0))
    yield runs

    executed = list(
        recent.filter(executed_at__isnull=False)
        .order_by("-planned_at")
        .values_list("planned_at", "executed_at")[:LATENESS_SAMPLE]
    )
    delays = sorted(max(0.0, (done - planned).total_seconds()) for planned, done in executed)
    lateness = GaugeMetricFamily(
        "iot_schedule_lateness_seconds",
        "Executed minus planned time of the runs executed in the last hour: quantiles "
        "(1 = the latest); no samples when none ran.",
        labels=["quantile"],
    )
    if delays:
        last = len(delays) - 1
        for label, q in QUANTILES:
            lateness.add_metric([label], delays[min(last, round(q * last))])
    yield lateness
