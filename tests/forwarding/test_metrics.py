"""Delivery metrics in the Prometheus exposition: outcomes, backlog, lag, latency per kind."""

from __future__ import annotations

from apps.core.metrics import render
from apps.forwarding.outbox import write_outbox

from .conftest import deliver_due, make_event, make_webhook
from .receiver import Answer


def test_delivery_metrics_are_exposed_per_kind(receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/ok", Answer(200))
    receiver.script("/down", Answer(500))
    make_webhook(alice_owner, receiver.url("/ok"))
    make_webhook(alice_owner, receiver.url("/down"))
    write_outbox([make_event(alice_lamp) for _ in range(3)])
    deliver_due()
    text = render().decode()
    assert 'iot_metrics_collector_up{collector="delivery"} 1.0' in text
    assert 'iot_delivery_deliveries_total{kind="webhook",outcome="delivered"} 3.0' in text
    assert 'iot_delivery_deliveries_total{kind="webhook",outcome="retried"} 3.0' in text
    assert 'iot_delivery_backlog{kind="webhook",status="pending"} 3.0' in text
    assert 'iot_delivery_destinations{kind="webhook",state="failing"} 1.0' in text
    assert 'iot_delivery_latency_seconds{kind="webhook",quantile="0.95"}' in text
    assert 'iot_delivery_oldest_due_seconds{kind="webhook"}' in text
