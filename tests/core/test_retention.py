"""Retention: history past its settings' days is deleted, in chunks, and nothing younger is."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.core import retention
from apps.core.tasks import prune_history
from apps.devices.models import (
    Command,
    CommandStatus,
    IssuerType,
    QuarantinedMessage,
    Telemetry,
    Transition,
    TransitionKind,
)
from apps.schedules.models import RunStatus, Schedule, ScheduleRun

pytestmark = pytest.mark.django_db

DAY = timedelta(days=1)


@pytest.fixture
def now():
    return timezone.now()


@pytest.fixture
def days(settings):
    settings.TELEMETRY_RETENTION_DAYS = 90
    settings.QUARANTINE_RETENTION_DAYS = 30
    settings.HISTORY_RETENTION_DAYS = 365
    return settings


def telemetry(device, at, n=1):
    Telemetry.objects.bulk_create(
        Telemetry(
            owner_id=device.owner_id,
            device=device,
            kind="telemetry",
            ts=at,
            received_at=at,
            topic=f"home/{device.device_id}/status",
            data={"i": i},
        )
        for i in range(n)
    )


def transition(device, at):
    return Transition.objects.create(
        owner_id=device.owner_id,
        device=device,
        kind=TransitionKind.CONNECTION,
        old="offline",
        new="online",
        cause="lwt",
        at=at,
    )


def quarantined(at, topic="nobody/knows"):
    return QuarantinedMessage.objects.create(
        received_at=at, topic=topic, reason="unknown_device", payload=b"{}", size=2
    )


def command(device, at, status=CommandStatus.CONFIRMED):
    return Command.objects.create(
        owner_id=device.owner_id,
        device=device,
        action="ON",
        issuer_type=IssuerType.USER,
        status=status,
        issued_at=at,
        expires_at=at + timedelta(minutes=5),
    )


def schedule_run(device, at, status=RunStatus.PUBLISHED, cmd=None):
    schedule, _ = Schedule.objects.get_or_create(
        owner_id=device.owner_id,
        name="evening",
        defaults={"device": device, "action": "ON", "cron": "0 18 * * *", "timezone": "UTC"},
    )
    return ScheduleRun.objects.create(
        owner_id=device.owner_id,
        schedule=schedule,
        device=device,
        planned_at=at,
        status=status,
        command=cmd,
        claim="test",
    )


def test_rows_older_than_their_tables_retention_are_deleted_and_younger_ones_kept(
    days, now, alice_lamp, charlie_lamp
):
    for device in (alice_lamp, charlie_lamp):  # every owner's rows, not only the first one's
        telemetry(device, now - 91 * DAY, 3)
        telemetry(device, now - 89 * DAY, 2)
        transition(device, now - 366 * DAY)
        transition(device, now - 364 * DAY)
        command(device, now - 366 * DAY)
        command(device, now - 364 * DAY)
    quarantined(now - 31 * DAY)
    kept_quarantine = quarantined(now - 29 * DAY)

    result = retention.prune(now)

    assert result.complete
    assert result.deleted == {
        "telemetry": 6,
        "transitions": 2,
        "quarantine": 1,
        "commands": 2,
        "schedule runs": 0,
    }
    assert Telemetry.objects.count() == 4
    assert not Telemetry.objects.filter(received_at__lt=now - 90 * DAY).exists()
    assert Transition.objects.count() == 2
    assert not Transition.objects.filter(at__lt=now - 365 * DAY).exists()
    assert list(QuarantinedMessage.objects.all()) == [kept_quarantine]
    assert set(Command.objects.values_list("issued_at", flat=True)) == {now - 364 * DAY}

    assert retention.prune(now).total == 0  # nothing left to do


def test_each_table_follows_its_own_setting_and_zero_keeps_forever(days, now, alice_lamp):
    days.TELEMETRY_RETENTION_DAYS = 0
    days.QUARANTINE_RETENTION_DAYS = 7
    telemetry(alice_lamp, now - 4000 * DAY)
    quarantined(now - 8 * DAY)
    quarantined(now - 6 * DAY)

    result = retention.prune(now)

    assert "telemetry" not in result.deleted
    assert Telemetry.objects.count() == 1
    assert result.deleted["quarantine"] == 1
    assert QuarantinedMessage.objects.count() == 1


def test_open_commands_are_kept_however_old(days, now, alice_lamp):
    # A command held for an offline device, or still waiting for its confirmation, is state,
    # not history: the sweeps that resolve it must still find it.
    old = now - 400 * DAY
    held = command(alice_lamp, old, CommandStatus.QUEUED)
    published = command(alice_lamp, old, CommandStatus.PUBLISHED)
    pending = command(alice_lamp, old, CommandStatus.PENDING)
    for status in (CommandStatus.CONFIRMED, CommandStatus.EXPIRED, CommandStatus.FAILED):
        command(alice_lamp, old, status)

    assert retention.prune(now).deleted["commands"] == 3
    assert set(Command.objects.all()) == {held, published, pending}


def test_schedule_runs_go_by_planned_time_in_every_status(days, now, alice_lamp):
    old, young = now - 366 * DAY, now - 364 * DAY
    for i, status in enumerate(RunStatus.values):
        schedule_run(alice_lamp, old - timedelta(minutes=i), status)
    kept = schedule_run(alice_lamp, young)

    assert retention.prune(now).deleted["schedule runs"] == len(RunStatus.values)
    assert list(ScheduleRun.objects.all()) == [kept]


def test_a_runs_command_past_retention_leaves_the_run_that_is_not(days, now, alice_lamp):
    # Commands go by the time they were issued, runs by their planned time: a run kept while
    # its command is pruned keeps its row, without the command.
    cmd = command(alice_lamp, now - 366 * DAY)
    run = schedule_run(alice_lamp, now - 364 * DAY, cmd=cmd)

    retention.prune(now)

    run.refresh_from_db()
    assert run.command_id is None
    assert not Command.objects.filter(pk=cmd.pk).exists()


def test_a_large_backlog_is_deleted_in_chunks_of_short_transactions(days, now, alice_lamp):
    telemetry(alice_lamp, now - 100 * DAY, 25)
    telemetry(alice_lamp, now - DAY, 2)

    with CaptureQueriesContext(connection) as queries:
        result = retention.prune(now, chunk=10, only=["telemetry"])

    assert result.deleted == {"telemetry": 25}
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3  # 10 + 10 + 5
    assert Telemetry.objects.count() == 2


def test_a_run_stops_after_its_time_budget_and_the_next_goes_on(days, now, alice_lamp):
    telemetry(alice_lamp, now - 100 * DAY, 25)
    quarantined(now - 100 * DAY)

    first = retention.prune(now, chunk=10, seconds=0)

    # At least one chunk, then the budget is spent: the tables after it wait for the next run.
    assert first.deleted == {"telemetry": 10}
    assert not first.complete
    assert QuarantinedMessage.objects.count() == 1

    runs = [first]
    while not runs[-1].complete:
        runs.append(retention.prune(now, chunk=10, seconds=0))
    assert sum(r.deleted.get("telemetry", 0) for r in runs) == 25
    assert Telemetry.objects.count() == 0
    assert QuarantinedMessage.objects.count() == 0


def test_the_chunk_query_uses_the_tables_index_not_a_sort_of_every_old_row(days, now, alice_lamp):
    # Telemetry's default ordering is -ts; the id query of a chunk must not carry it (it would
    # sort all of an owner's old rows for every chunk), and it is scoped by the owner, the first
    # column of the (owner, -received_at) index.
    telemetry(alice_lamp, now - 100 * DAY, 3)
    with CaptureQueriesContext(connection) as queries:
        retention.prune(now, only=["telemetry"])
    selects = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith("SELECT") and "devices_telemetry" in q["sql"]
    ]
    assert selects
    for sql in selects:
        assert "ORDER BY" not in sql
        assert '"owner_id" =' in sql


def test_the_task_prunes_and_beat_runs_it_every_retention_prune_minutes(
    days, now, alice_lamp, settings
):
    from iotplatform.celery import app

    telemetry(alice_lamp, now - 100 * DAY, 2)
    assert prune_history()["telemetry"] == 2

    entry = app.conf.beat_schedule["core.prune_history"]
    assert entry["task"] == "core.prune_history"
    assert entry["schedule"] == settings.RETENTION_PRUNE_MINUTES * 60


def test_the_command_counts_first_and_then_deletes(days, now, alice_lamp):
    telemetry(alice_lamp, now - 100 * DAY, 4)
    quarantined(now - 100 * DAY)
    days.HISTORY_RETENTION_DAYS = 0

    out = StringIO()
    call_command("prune_history", "--dry-run", stdout=out)
    text = out.getvalue()
    assert "telemetry: would delete 4 rows older than 90 days" in text
    assert "quarantine: would delete 1 rows older than 30 days" in text
    assert "transitions: kept forever (HISTORY_RETENTION_DAYS=0)" in text
    assert Telemetry.objects.count() == 4  # a dry run deletes nothing

    out = StringIO()
    call_command("prune_history", "--table", "telemetry", stdout=out)
    assert out.getvalue().strip() == "telemetry: deleted 4 rows older than 90 days"
    assert Telemetry.objects.count() == 0
    assert QuarantinedMessage.objects.count() == 1  # not asked for


def test_the_command_refuses_an_unknown_table(days):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="invalid choice"):
        call_command("prune_history", "--table", "users")
