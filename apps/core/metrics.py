"""Prometheus metrics for `/metrics`: a small registry of collectors that read the database.

The platform runs as several processes (web, listener, workers), so per-process counters would
each see a slice. What operators alert on is read from the shared database at scrape time
instead: device states, quarantine, ingest volume, and — registered by the apps that own them —
delivery backlog, schedule lag and so on.

Adding metrics from another app: create `apps/<app>/metrics.py` (imported automatically on the
first scrape) with

    from prometheus_client.core import GaugeMetricFamily
    from apps.core.metrics import register_collector

    @register_collector("delivery")
    def delivery_metrics():
        backlog = GaugeMetricFamily("iot_delivery_backlog", "Deliveries waiting", labels=["kind"])
        backlog.add_metric(["webhook"], 12)
        yield backlog

A collector that raises is skipped for that scrape and reported by
`iot_metrics_collector_up{collector="<name>"} 0`; the others still answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta

from django.db.models import Count, Max
from django.utils import timezone
from django.utils.module_loading import autodiscover_modules
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

CollectFunc = Callable[[], Iterable[Metric]]
_collectors: dict[str, CollectFunc] = {}


def register_collector(name: str) -> Callable[[CollectFunc], CollectFunc]:
    """Decorator: add a function yielding metric families to `/metrics` under `name`."""

    def decorator(func: CollectFunc) -> CollectFunc:
        _collectors[name] = func  # by name, so a re-import replaces instead of duplicating
        return func

    return decorator


class _RegisteredCollectors(Collector):
    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "iot_metrics_collector_up",
            "1 when the collector answered on this scrape, 0 when it failed.",
            labels=["collector"],
        )
        for name, func in list(_collectors.items()):
            try:
                families = list(func())
            except Exception:
                log.exception("metrics collector %s failed", name)
                up.add_metric([name], 0)
                continue
            up.add_metric([name], 1)
            yield from families
        yield up


REGISTRY = CollectorRegistry()
REGISTRY.register(_RegisteredCollectors())
ProcessCollector(registry=REGISTRY)  # the web process's own CPU and memory

_discovered = False


def render() -> bytes:
    """The Prometheus text exposition of every registered collector."""
    global _discovered
    if not _discovered:
        autodiscover_modules("metrics")
        _discovered = True
    return generate_latest(REGISTRY)


# --- Built-in collectors: devices and ingest ---------------------------------------------------

# The telemetry table is the platform's largest; it has no index on `received_at` alone. Ids grow
# with insertion, so a count restricted to the newest ids walks the primary key, not the table.
# It saturates above TELEMETRY_WINDOW rows a minute (~33k msg/s), far beyond one listener.
TELEMETRY_WINDOW = 2_000_000


@register_collector("devices")
def device_metrics() -> Iterator[Metric]:
    from apps.devices.models import Connection, Device, Profile

    devices = GaugeMetricFamily(
        "iot_devices",
        "Registered devices by profile and connection state.",
        labels=["profile", "connection"],
    )
    counts = {
        (row["profile"], row["connection"]): row["n"]
        for row in Device.objects.order_by().values("profile", "connection").annotate(n=Count("id"))
    }
    # Every combination, zeros included, so that alerts on "online == 0" have a series to read.
    for profile in Profile.values:
        for connection in Connection.values:
            devices.add_metric([profile, connection], counts.get((profile, connection), 0))
    yield devices


def newest_telemetry_at() -> datetime | None:
    """When the newest telemetry row was received (by id: the primary key, not a scan)."""
    from apps.devices.models import Telemetry

    return Telemetry.objects.order_by("-id").values_list("received_at", flat=True).first()


@register_collector("ingest")
def ingest_metrics() -> Iterator[Metric]:
    from apps.devices.models import QuarantinedMessage, QuarantineReason, Telemetry

    now = timezone.now()
    minute_ago = now - timedelta(minutes=1)

    last_id = Telemetry.objects.aggregate(last=Max("id"))["last"] or 0
    recent = Telemetry.objects.filter(
        id__gt=last_id - TELEMETRY_WINDOW, received_at__gte=minute_ago
    )
    yield GaugeMetricFamily(
        "iot_telemetry_rows_last_minute",
        "Telemetry rows (readings, statuses, hellos, acks) received in the last 60 s.",
        value=recent.count(),
    )
    newest = newest_telemetry_at()
    yield GaugeMetricFamily(
        "iot_telemetry_last_received_timestamp_seconds",
        "Unix time of the newest telemetry row; 0 when there is none.",
        value=newest.timestamp() if newest else 0,
    )

    kept = GaugeMetricFamily(
        "iot_quarantined_messages", "Quarantined messages kept, by reason.", labels=["reason"]
    )
    last_minute = GaugeMetricFamily(
        "iot_quarantined_messages_last_minute",
        "Messages quarantined in the last 60 s, by reason.",
        labels=["reason"],
    )
    totals = dict(
        QuarantinedMessage.objects.order_by().values_list("reason").annotate(n=Count("id"))
    )
    recent_q = dict(
        QuarantinedMessage.objects.filter(received_at__gte=minute_ago)
        .order_by()
        .values_list("reason")
        .annotate(n=Count("id"))
    )
    for reason in QuarantineReason.values:
        kept.add_metric([reason], totals.get(reason, 0))
        last_minute.add_metric([reason], recent_q.get(reason, 0))
    yield kept
    yield last_minute
