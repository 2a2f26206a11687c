"""Live-page metrics for `/metrics`. Unlike the series read from the database, WebSocket clients
exist only in the web process holding their socket: each web instance reports its own, and
Prometheus (which scrapes every instance) sums them."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from apps.core.metrics import register_collector

from . import consumers


@register_collector("live")
def live_metrics() -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "iot_websocket_clients",
        "Live-page WebSocket clients connected to this web process (sum over instances).",
        value=consumers.connected(),
    )
