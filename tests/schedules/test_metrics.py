"""Schedule series on /metrics: an overdue schedule (runner down), runs by status, lateness."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.devices.models import Device, Profile
from apps.schedules.models import RunStatus, Schedule, ScheduleRun
from tests.core.test_health import parse

pytestmark = pytest.mark.django_db


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    found = parse(response.content.decode())
    assert found["iot_metrics_collector_up"][(("collector", "schedules"),)] == 1
    return found


def schedule(owner, device, name, next_run_at, enabled=True) -> Schedule:
    return Schedule.objects.create(
        owner=owner,
        name=name,
        device=device,
        action="ON",
        cron="0 18 * * *",
        timezone="UTC",
        enabled=enabled,
        next_run_at=next_run_at,
    )


def test_nothing_due_reads_zero_and_no_lateness_samples(client, alice_owner, alice_lamp):
    schedule(alice_owner, alice_lamp, "later", timezone.now() + timedelta(hours=1))

    found = scrape(client)

    assert found["iot_schedule_overdue_seconds"][()] == 0
    assert found["iot_schedules_enabled"][()] == 1
    assert found["iot_schedule_runs_last_hour"][(("status", "missed"),)] == 0
    assert "iot_schedule_lateness_seconds" not in found


def test_an_overdue_schedule_shows_how_long_it_has_waited(client, alice_owner, alice_lamp):
    # What an alert on "the runner is not running" reads: beat or the workers are down.
    now = timezone.now()
    schedule(alice_owner, alice_lamp, "stuck", now - timedelta(minutes=10))
    schedule(alice_owner, alice_lamp, "also due", now - timedelta(minutes=2))
    schedule(alice_owner, alice_lamp, "off", now - timedelta(days=3), enabled=False)

    found = scrape(client)

    assert found["iot_schedule_overdue_seconds"][()] == pytest.approx(600, abs=30)
    assert found["iot_schedules_enabled"][()] == 2


def test_runs_of_the_last_hour_by_status_and_their_lateness(client, alice_owner, alice_lamp):
    now = timezone.now().replace(microsecond=0)
    sched = schedule(alice_owner, alice_lamp, "evening", now + timedelta(days=1))
    other = Device.objects.create(
        owner=alice_owner, device_id="alice-lamp-2", name="Hall", profile=Profile.ESP32_LAMP
    )

    def run(minutes_ago: int, status: str, late_ms: int | None, device=alice_lamp) -> None:
        planned = now - timedelta(minutes=minutes_ago)
        ScheduleRun.objects.create(
            owner=alice_owner,
            schedule=sched,
            device=device,
            planned_at=planned,
            executed_at=None if late_ms is None else planned + timedelta(milliseconds=late_ms),
            status=status,
            claim="test",
        )

    for minute, late in enumerate([10, 20, 30, 40, 50, 60, 70, 80, 90, 4000], start=1):
        run(minute, RunStatus.PUBLISHED, late)
    run(30, RunStatus.MISSED, None, device=other)
    run(90, RunStatus.PUBLISHED, 99_000)  # planned before the window: not counted

    found = scrape(client)

    runs = found["iot_schedule_runs_last_hour"]
    assert runs[(("status", "published"),)] == 10
    assert runs[(("status", "missed"),)] == 1
    assert runs[(("status", "failed"),)] == 0
    lateness = found["iot_schedule_lateness_seconds"]
    assert lateness[(("quantile", "0.5"),)] == pytest.approx(0.05, abs=0.011)
    assert lateness[(("quantile", "0.95"),)] == pytest.approx(4.0)
    assert lateness[(("quantile", "1"),)] == pytest.approx(4.0)
