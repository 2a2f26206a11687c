"""The schedule runner on a real broker: one command per (schedule, planned time), whatever
happens to the runners; missed runs after an outage; every run recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from apps.devices import commands
from apps.devices.models import Command, CommandStatus, Connection, Device, OfflinePolicy, Profile
from apps.schedules import actions
from apps.schedules.actions import run_due_schedules, sweep_runs
from apps.schedules.models import DeviceGroup, RunStatus, Schedule, ScheduleRun
from tests.conftest import subprocess_env
from tests.schedules import spy as spying
from tests.schedules.spy import unique

ROOT = Path(__file__).resolve().parents[2]

command_broker = spying.command_broker
spy = spying.spy


def make_lamp(owner, **extra) -> Device:
    fields = {"connection": Connection.ONLINE, "profile": Profile.ESP32_LAMP, **extra}
    return Device.objects.create(owner=owner, device_id=unique("sched-lamp"), **fields)


def daily_at(at: datetime) -> str:
    """A cron whose next run after `at` is a day away: no second run while a test runs."""
    return f"{at.minute} {at.hour} * * *"


def make_schedule(owner, device=None, *, due_at: datetime, cron: str | None = None, **extra):
    cron = cron or daily_at(due_at)
    return Schedule.objects.create(
        owner=owner,
        name=extra.pop("name", "evening"),
        device=device,
        action="ON",
        cron=cron,
        timezone=extra.pop("tz", "UTC"),
        next_run_at=due_at,
        **extra,
    )


def this_minute() -> datetime:
    """A planned time less than a minute old (well within the grace window)."""
    return timezone.now().replace(second=0, microsecond=0)


# --- one pass -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_due_schedule_publishes_one_command_and_records_its_run(spy, alice_owner):
    lamp = make_lamp(alice_owner)
    planned = this_minute()
    schedule = make_schedule(alice_owner, lamp, due_at=planned)

    report = run_due_schedules()

    assert (report.due, report.published, report.missed) == (1, 1, 0)
    [seen] = spy.wait_for(f"home/{lamp.device_id}/cmd")
    assert seen.json()["action"] == "ON" and seen.retain is False
    run = ScheduleRun.objects.get(schedule=schedule)
    assert run.planned_at == planned and run.status == RunStatus.PUBLISHED
    assert run.executed_at >= planned and run.lateness >= timedelta(0)
    assert run.command.status == CommandStatus.PUBLISHED
    assert str(run.command.request_id) == seen.json()["requestId"]
    assert (run.command.issuer_type, run.command.issuer_id) == ("schedule", str(schedule.pk))
    schedule.refresh_from_db()
    assert schedule.next_run_at == planned + timedelta(days=1)
    assert schedule.last_run_at == planned


@pytest.mark.django_db
def test_a_second_pass_over_the_same_planned_time_publishes_nothing(spy, alice_owner):
    lamp = make_lamp(alice_owner)
    planned = this_minute()
    schedule = make_schedule(alice_owner, lamp, due_at=planned)
    run_due_schedules()
    # As if a second runner had read the schedule before the first one moved it on.
    Schedule.objects.filter(pk=schedule.pk).update(next_run_at=planned)

    report = run_due_schedules()

    assert (report.published, report.taken) == (0, 1)
    assert len(spy.settle(f"home/{lamp.device_id}/cmd", quiet=0.3)) == 1
    assert Command.objects.filter(device=lamp).count() == 1


@pytest.mark.django_db
def test_a_group_schedule_records_one_run_and_one_command_per_device(spy, alice_owner):
    lamps = [make_lamp(alice_owner) for _ in range(3)]
    group = DeviceGroup.objects.create(owner=alice_owner, name="street")
    group.devices.set(lamps)
    planned = this_minute()
    Schedule.objects.create(
        owner=alice_owner,
        name="street lights",
        group=group,
        action="OFF",
        cron=daily_at(planned),
        timezone="UTC",
        next_run_at=planned,
    )

    assert run_due_schedules().published == 3
    for lamp in lamps:
        [seen] = spy.wait_for(f"home/{lamp.device_id}/cmd")
        assert seen.json()["action"] == "OFF"
    assert ScheduleRun.objects.filter(status=RunStatus.PUBLISHED).count() == 3


@pytest.mark.django_db
def test_offline_devices_follow_their_policy_in_scheduled_runs(spy, alice_owner):
    refusing = make_lamp(alice_owner, connection=Connection.OFFLINE)
    holding = make_lamp(
        alice_owner, connection=Connection.OFFLINE, offline_policy=OfflinePolicy.QUEUE
    )
    planned = this_minute()
    make_schedule(alice_owner, refusing, due_at=planned, name="a")
    make_schedule(alice_owner, holding, due_at=planned, name="b")

    report = run_due_schedules()

    assert (report.failed, report.held, report.published) == (1, 1, 0)
    failed = ScheduleRun.objects.get(device=refusing)
    assert failed.status == RunStatus.FAILED and "offline" in failed.detail
    held = ScheduleRun.objects.get(device=holding)
    assert held.status == RunStatus.HELD and held.command.status == CommandStatus.QUEUED
    # Held no longer than the grace window: a late evening ON is not sent at midnight.
    assert held.command.expires_at == held.command.issued_at + actions.grace()
    assert spy.settle("sched-lamp", quiet=0.3) == []


@pytest.mark.django_db
def test_a_run_at_a_nonexistent_local_time_runs_once_at_the_end_of_the_gap(spy, alice_owner):
    lamp = make_lamp(alice_owner)
    schedule = make_schedule(
        alice_owner,
        lamp,
        cron="30 2 * * *",
        tz="Europe/Berlin",
        due_at=datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
    )
    gap_end = datetime(2026, 3, 29, 1, 0, 5, tzinfo=UTC)
    assert run_due_schedules(now=gap_end).published == 1
    assert run_due_schedules(now=gap_end + timedelta(minutes=1)).due == 0
    schedule.refresh_from_db()
    assert schedule.next_run_at == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)  # 02:30 CEST
    assert len(spy.settle(f"home/{lamp.device_id}/cmd", quiet=0.3)) == 1


# --- missed runs --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_after_a_two_hour_outage_runs_within_grace_run_late_and_older_ones_are_missed(
    spy, alice_owner, settings
):
    settings.SCHEDULE_GRACE_SECONDS = 300
    back = datetime(2026, 6, 1, 12, 2, tzinfo=UTC)  # the platform is back at 12:02
    outage_start = back - timedelta(hours=2)
    recent = make_lamp(alice_owner)  # every 15 min: 12:00 is 2 min old, within grace
    hourly_late = make_lamp(alice_owner)  # at :50: 11:50 is 12 min old, beyond grace
    quarter = make_schedule(
        alice_owner,
        recent,
        cron="*/15 * * * *",
        due_at=datetime(2026, 6, 1, 10, 15, tzinfo=UTC),
        name="quarter",
    )
    hourly = make_schedule(
        alice_owner,
        hourly_late,
        cron="50 * * * *",
        name="hourly",
        due_at=datetime(2026, 6, 1, 10, 50, tzinfo=UTC),
    )
    assert quarter.next_run_at > outage_start and hourly.next_run_at > outage_start

    report = run_due_schedules(now=back)

    # Quarter: 10:15 … 11:45 missed (7), 12:00 runs late. Hourly: 10:50 and 11:50 missed.
    assert (report.published, report.missed) == (1, 9)
    runs = {(r.schedule_id, r.planned_at.strftime("%H:%M")): r for r in ScheduleRun.objects.all()}
    assert runs[(quarter.pk, "12:00")].status == RunStatus.PUBLISHED
    assert runs[(quarter.pk, "12:00")].command is not None
    missed_quarter = [k for k, r in runs.items() if k[0] == quarter.pk and r.status == "missed"]
    assert len(missed_quarter) == 7
    assert all(
        r.command is None and r.executed_at is None
        for r in runs.values()
        if r.status == RunStatus.MISSED
    )
    assert {k[1] for k, r in runs.items() if k[0] == hourly.pk} == {"10:50", "11:50"}
    # No burst: one command in all, and the schedules are back on their normal rhythm.
    assert len(spy.settle("sched-lamp", quiet=0.5)) == 1
    quarter.refresh_from_db()
    hourly.refresh_from_db()
    assert quarter.next_run_at == datetime(2026, 6, 1, 12, 15, tzinfo=UTC)
    assert hourly.next_run_at == datetime(2026, 6, 1, 12, 50, tzinfo=UTC)


@pytest.mark.django_db
def test_a_disabled_then_reenabled_schedule_does_not_catch_up(alice_owner, settings):
    lamp = make_lamp(alice_owner)
    schedule = make_schedule(alice_owner, lamp, due_at=timezone.now() - timedelta(hours=3))
    actions.set_enabled(schedule, False)
    assert run_due_schedules().due == 0
    actions.set_enabled(schedule, True)
    schedule.refresh_from_db()
    assert schedule.next_run_at > timezone.now()
    assert not ScheduleRun.objects.exists()


# --- several runners, and runners that die -------------------------------------------------------


def start_runners(modes: list[str], tmp_path: Path, broker) -> tuple[list, Path, Path]:
    go, marker = tmp_path / "go", tmp_path / "marker"
    env = subprocess_env(
        MQTT_URL=broker.url,
        MQTT_PROTOCOL=broker.protocol,
        CHANNEL_LAYER_URL="memory",
        COMMAND_PUBLISH_TIMEOUT="5",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.schedules.runner_proc", mode, str(go), str(marker)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in modes
    ]
    time.sleep(2.0)  # let them import Django and wait on the go file
    go.write_text("go")
    return procs, go, marker


def wait_for_file(path: Path, procs, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"runner exited early: {p.communicate()}")
        assert time.monotonic() < deadline, "runner never reached the publish"
        time.sleep(0.02)


def due_lamps(owner, count: int) -> tuple[list[Device], datetime]:
    planned = this_minute()
    lamps = [make_lamp(owner) for _ in range(count)]
    for i, lamp in enumerate(lamps):
        make_schedule(owner, lamp, due_at=planned, name=f"s{i}")
    return lamps, planned


def per_device(spy, lamps) -> dict[str, int]:
    spy.settle("sched-lamp", quiet=0.7)
    return {lamp.device_id: len(spy.on(f"home/{lamp.device_id}/cmd")) for lamp in lamps}


@pytest.mark.django_db(transaction=True)
def test_two_runners_at_once_publish_exactly_one_command_per_planned_time(
    spy, command_broker, alice_owner, tmp_path
):
    lamps, _ = due_lamps(alice_owner, 40)

    procs, _, _ = start_runners(["run", "run"], tmp_path, command_broker)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs

    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sum(r["published"] for r in reports) == 40
    assert per_device(spy, lamps) == {lamp.device_id: 1 for lamp in lamps}
    assert ScheduleRun.objects.filter(status=RunStatus.PUBLISHED).count() == 40
    assert Command.objects.count() == 40


@pytest.mark.django_db(transaction=True)
def test_a_runner_killed_after_publishing_is_not_followed_by_a_second_command(
    spy, command_broker, alice_owner, tmp_path
):
    lamps, _ = due_lamps(alice_owner, 10)
    procs, _, marker = start_runners(["hang-after-publish"], tmp_path, command_broker)
    wait_for_file(marker, procs)
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait(10)
    assert per_device(spy, lamps) == {lamp.device_id: 1 for lamp in lamps}

    # A fresh runner (its next_run_at was never moved on) and the sweeps change nothing.
    report = run_due_schedules()
    assert (report.published, report.taken) == (0, 10)
    later = timezone.now() + timedelta(minutes=10)
    commands.sweep(now=later)
    assert sweep_runs(now=later) == 10
    assert per_device(spy, lamps) == {lamp.device_id: 1 for lamp in lamps}
    for run in ScheduleRun.objects.select_related("command"):
        assert run.status == RunStatus.FAILED and "may not have gone out" in run.detail
        assert run.command.status == CommandStatus.UNCONFIRMED


@pytest.mark.django_db(transaction=True)
def test_a_runner_killed_before_publishing_never_leads_to_a_late_command(
    spy, command_broker, alice_owner, tmp_path
):
    lamps, _ = due_lamps(alice_owner, 10)
    procs, _, marker = start_runners(["hang-before-publish"], tmp_path, command_broker)
    wait_for_file(marker, procs)  # claimed and committed; about to publish
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait(10)

    # The claims stand: a fresh runner does not publish them late (at most once).
    report = run_due_schedules()
    assert (report.published, report.taken) == (0, 10)
    later = timezone.now() + timedelta(minutes=10)
    commands.sweep(now=later)
    assert sweep_runs(now=later) == 10
    assert per_device(spy, lamps) == {lamp.device_id: 0 for lamp in lamps}
    assert set(ScheduleRun.objects.values_list("status", flat=True)) == {RunStatus.FAILED}


@pytest.mark.django_db
def test_the_runner_loop_prepares_ahead_but_never_publishes_before_the_planned_instant(
    spy, alice_owner, settings
):
    settings.SCHEDULE_PREPARE_SECONDS = 1.5
    lamps = [make_lamp(alice_owner) for _ in range(5)]
    planned = (timezone.now() + timedelta(seconds=2)).replace(microsecond=0)
    daily = f"{planned.minute} {planned.hour} * * *"  # its next run is a day away
    for i, lamp in enumerate(lamps):
        make_schedule(alice_owner, lamp, due_at=planned, cron=daily, name=f"p{i}")

    report = actions.run_schedules_for(4.0)

    assert report.published == 5
    for lamp in lamps:
        [seen] = spy.wait_for(f"home/{lamp.device_id}/cmd")
        assert seen.at >= planned.timestamp()
    for run in ScheduleRun.objects.select_related("command"):
        assert run.executed_at >= run.planned_at == planned
        assert run.command.issued_at < planned  # claimed and written ahead
