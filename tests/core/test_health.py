"""/healthz, /readyz and /metrics, against real dependencies (and real broken ones)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from apps.core import health, metrics
from apps.devices.models import (
    Connection,
    EventKind,
    QuarantinedMessage,
    QuarantineReason,
    Telemetry,
)

# The channel-layer check touches the layer's own database in the embedded mode.
all_databases = pytest.mark.django_db(databases="__all__")


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (kernel backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_healthz_answers_without_touching_the_database(client) -> None:
    # No db fixture: pytest-django would fail the test on any query.
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]


@all_databases
def test_readyz_is_ok_when_every_dependency_answers(client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "channel_layer", "celery_broker"}
    assert all(check["ok"] for check in body["checks"].values())


@all_databases
def test_readyz_is_503_naming_the_celery_broker_when_it_is_down(
    client, settings, closed_port
) -> None:
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{closed_port}/0"
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["celery_broker"]["ok"] is False
    assert "refused" in body["checks"]["celery_broker"]["error"].lower()
    # The other dependencies are still checked and reported.
    assert body["checks"]["database"]["ok"] is True


@all_databases
def test_readyz_is_503_when_the_channel_layer_is_unreachable(client, settings, closed_port) -> None:
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{closed_port}/0"]},
        }
    }
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["channel_layer"]["ok"] is False


@all_databases
def test_readyz_gives_up_on_a_dependency_that_hangs(
    client, settings, monkeypatch, silent_port
) -> None:
    monkeypatch.setattr(health, "READINESS_TIMEOUT", 0.5)
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{silent_port}/0"]},
        }
    }
    response = client.get("/readyz")
    assert response.status_code == 503
    check = response.json()["checks"]["channel_layer"]
    assert check == {"ok": False, "ms": check["ms"], "error": "timed out after 0.5 s"}


def parse(text: str) -> dict[str, dict[tuple, float]]:
    """{metric name: {sorted label items: value}} from a Prometheus text exposition."""
    result: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return result


@pytest.mark.django_db
def test_metrics_reports_devices_quarantine_and_recent_telemetry(
    client, alice_lamp, alice_relay, alice_meter, charlie_lamp
) -> None:
    for device in (alice_lamp, alice_meter):
        device.connection = Connection.ONLINE
        device.save()
    now = timezone.now()
    for age in (timedelta(seconds=5), timedelta(seconds=30), timedelta(minutes=5)):
        Telemetry.objects.create(
            owner=alice_meter.owner,
            device=alice_meter,
            kind=EventKind.TELEMETRY,
            ts=now - age,
            received_at=now - age,
            topic="iot/alice-meter-1/telemetry",
            data={},
        )
    for reason, age in [
        (QuarantineReason.MALFORMED, timedelta(seconds=1)),
        (QuarantineReason.MALFORMED, timedelta(hours=1)),
        (QuarantineReason.UNKNOWN_DEVICE, timedelta(seconds=1)),
    ]:
        QuarantinedMessage.objects.create(
            received_at=now - age, topic="home/x/status", reason=reason, payload=b"{", size=1
        )

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    found = parse(response.content.decode())
    devices = found["iot_devices"]
    assert devices[(("connection", "online"), ("profile", "esp32-lamp"))] == 1
    assert devices[(("connection", "unknown"), ("profile", "esp32-lamp"))] == 1  # charlie's
    assert devices[(("connection", "online"), ("profile", "meter-v2"))] == 1
    assert devices[(("connection", "unknown"), ("profile", "tasmota"))] == 1
    assert devices[(("connection", "offline"), ("profile", "tasmota"))] == 0  # zeros are kept
    assert found["iot_telemetry_rows_last_minute"][()] == 2
    assert found["iot_telemetry_last_received_timestamp_seconds"][()] == pytest.approx(
        (now - timedelta(minutes=5)).timestamp()  # the newest *id*, created last
    )
    assert found["iot_quarantined_messages"][(("reason", "malformed"),)] == 2
    assert found["iot_quarantined_messages_last_minute"][(("reason", "malformed"),)] == 1
    assert found["iot_quarantined_messages_last_minute"][(("reason", "unknown_device"),)] == 1
    assert found["iot_quarantined_messages"][(("reason", "oversize"),)] == 0
    up = found["iot_metrics_collector_up"]
    assert up[(("collector", "devices"),)] == 1 and up[(("collector", "ingest"),)] == 1
    assert "process_cpu_seconds_total" in found


@pytest.mark.django_db
def test_a_failing_collector_is_reported_and_does_not_break_the_others(client) -> None:
    @metrics.register_collector("broken-for-test")
    def broken():
        raise RuntimeError("boom")
        yield  # pragma: no cover

    try:
        found = parse(client.get("/metrics").content.decode())
    finally:
        metrics._collectors.pop("broken-for-test")
    assert found["iot_metrics_collector_up"][(("collector", "broken-for-test"),)] == 0
    assert "iot_devices" in found


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("Bearer wrong-token", 401),
        ("Basic s3cret-metrics", 401),
        ("Bearer s3cret-metrics", 200),
    ],
)
def test_metrics_require_the_bearer_token_when_one_is_set(client, settings, header, status) -> None:
    settings.METRICS_TOKEN = "s3cret-metrics"
    headers = {"Authorization": header} if header else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert b"iot_devices" not in response.content
