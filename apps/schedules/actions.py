"""Schedule state changes: saving, enabling, and running them exactly once per planned time.

The runner (`run_due_schedules`), for every enabled schedule whose `next_run_at` has come:

1. lists the planned times up to now; the newest within the grace window runs, every older
   one is recorded `missed` (after an outage: no burst of stale ON/OFF commands);
2. in ONE transaction inserts a `ScheduleRun` per (schedule, device, planned time) with its own
   claim token — the unique constraint means that of two runners only one creates each row —
   and writes the commands for the rows it created;
3. commits, and only then publishes those commands (pipelined, QoS 1);
4. records the results and moves `next_run_at` on (compare-and-set, so an edit made
   meanwhile wins).

A runner killed after step 2 leaves claimed rows: nothing publishes them again (at most once);
`sweep_runs` later records them as failed, or as published when their command went out.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Min
from django.utils import timezone

from apps.devices.commands import CommandRefused, Issuer, build_command, publish_commands
from apps.devices.models import Command, CommandStatus, Device
from apps.owners.models import Role
from apps.owners.scoping import has_role

from . import cron
from .models import RunStatus, Schedule, ScheduleRun

log = logging.getLogger(__name__)

# Missed planned times recorded per schedule per catch-up; older ones are only counted.
MAX_MISSED_RECORDED = 100
# Schedules handled per pass; the rest are due in the next pass a moment later.
BATCH = 5000


def grace() -> timedelta:
    return timedelta(seconds=int(getattr(settings, "SCHEDULE_GRACE_SECONDS", 300)))


class NotAllowed(Exception):
    """The user may not change this schedule."""


# --- saving -------------------------------------------------------------------------------------


def save_schedule(schedule: Schedule, *, user=None, now: datetime | None = None) -> Schedule:
    """Validate (field errors as ValidationError) and save, with `next_run_at` from now."""
    if user is not None and not has_role(user, schedule.owner_id, Role.ADMIN):
        raise NotAllowed("Only admins and owners may change schedules.")
    schedule.full_clean()
    with transaction.atomic():
        schedule.next_run_at = _next_from(schedule, now or timezone.now())
        schedule.save()
    return schedule


def set_enabled(schedule: Schedule, enabled: bool, *, user=None) -> Schedule:
    """Enable or disable. Re-enabling starts from now: the paused period is not caught up."""
    if user is not None and not has_role(user, schedule.owner_id, Role.OPERATOR):
        raise NotAllowed("Only operators, admins and owners may enable or disable schedules.")
    schedule.enabled = enabled
    schedule.next_run_at = _next_from(schedule, timezone.now())
    Schedule.objects.filter(pk=schedule.pk).update(
        enabled=enabled, next_run_at=schedule.next_run_at, updated_at=timezone.now()
    )
    return schedule


def _next_from(schedule: Schedule, now: datetime) -> datetime | None:
    return schedule.compute_next_run(now) if schedule.enabled else None


# --- running ------------------------------------------------------------------------------------


@dataclass
class RunReport:
    due: int = 0  # schedules found due
    published: int = 0  # commands the broker acknowledged
    held: int = 0  # commands held for offline devices ("queue" policy)
    failed: int = 0  # refused (offline "reject", invalid) or not accepted by the broker
    missed: int = 0  # planned times older than the grace window (or superseded)
    taken: int = 0  # runs another runner had already claimed

    def __iadd__(self, other: RunReport) -> RunReport:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass
class _Plan:
    schedule: Schedule
    devices: list[Device]
    run_at: datetime | None  # the planned time to execute, if within grace
    missed: list[tuple[datetime, str]]  # (planned time, why)
    next_run_at: datetime | None
    last_planned: datetime


def run_due_schedules(
    now: datetime | None = None, *, publish_at: datetime | None = None, sleep=time.sleep
) -> RunReport:
    """One pass of the runner; safe to run concurrently and after a crash (see module doc).

    `now`: the instant to plan for (the runs planned up to it). `publish_at`: claim and write
    now, publish at that instant — `run_schedules_for` prepares a moment before the planned
    instant, so that the database work does not delay the commands.
    """
    now = now or timezone.now()
    report = RunReport()
    due = list(
        Schedule.objects.filter(enabled=True, next_run_at__lte=now)
        .select_related("device", "group")
        .prefetch_related("group__devices")
        .order_by("next_run_at")[:BATCH]
    )
    if not due:
        return report
    report.due = len(due)
    plans = [p for p in (_plan(s, now) for s in due) if p is not None]
    report.taken = _skip_claimed(plans)

    token = uuid.uuid4().hex
    with transaction.atomic():
        rows = [
            ScheduleRun(
                owner_id=p.schedule.owner_id,
                schedule=p.schedule,
                device=d,
                planned_at=at,
                status=RunStatus.MISSED,
                detail=why[:255],
                claim=token,
            )
            for p in plans
            for at, why in p.missed
            for d in p.devices
        ]
        rows += _runs_with_commands(plans, token, now)
        # The claim: rows another runner inserted first are silently skipped here...
        ScheduleRun.objects.bulk_create(rows, ignore_conflicts=True, batch_size=500)
        mine = list(ScheduleRun.objects.filter(claim=token).only("id", "status", "command_id"))
        # ...and the commands written for them are dropped unsent, in this same transaction.
        kept = {r.command_id for r in mine if r.command_id}
        written = [r.command for r in rows if r.command is not None]
        orphans = [c.pk for c in written if c.pk not in kept]
        if orphans:
            Command.objects.filter(pk__in=orphans).delete()
        run_pks = {r.command_id: r.pk for r in mine if r.command_id}
        claimed = [r for r in rows if r.status != RunStatus.MISSED and r.command_id in kept]
        for r in claimed:
            r.pk = run_pks[r.command_id]  # ignore_conflicts leaves the inserted rows' ids unset
        report.taken += sum(1 for r in rows if r.status != RunStatus.MISSED) - sum(
            1 for r in mine if r.status != RunStatus.MISSED
        )
        report.missed = sum(1 for r in mine if r.status == RunStatus.MISSED)
        report.failed = sum(1 for r in mine if r.status == RunStatus.FAILED)
        report.held = sum(1 for r in mine if r.status == RunStatus.HELD)

    pending = [r.command for r in claimed if r.command.status == CommandStatus.PENDING]
    if publish_at is not None and pending:
        sleep(max(0.0, (publish_at - timezone.now()).total_seconds()))
    publish_commands(pending)
    _record_results([r for r in claimed if r.status == RunStatus.CLAIMED], report)
    _advance(plans)
    return report


def _plan(schedule: Schedule, now: datetime) -> _Plan | None:
    """Which planned times (up to now) run, and which are missed."""
    try:
        parsed, zone = schedule.parsed(), schedule.zone()
        planned: deque[datetime] = deque([schedule.next_run_at], maxlen=MAX_MISSED_RECORDED + 1)
        skipped = 0
        next_run_at = None
        for occ in cron.occurrences(
            parsed,
            zone,
            schedule.next_run_at,
            starts_on=schedule.starts_on,
            ends_on=schedule.ends_on,
        ):
            if occ.at > now:
                next_run_at = occ.at
                break
            if len(planned) == planned.maxlen:
                skipped += 1
            planned.append(occ.at)
        devices = schedule.targets()
    except (cron.CronError, ValueError):
        log.exception("schedule %s cannot be evaluated; disabling it", schedule.pk)
        Schedule.objects.filter(pk=schedule.pk).update(enabled=False, next_run_at=None)
        return None

    latest = planned[-1]
    run_at = latest if now - latest <= grace() else None
    late = f"missed: more than {int(grace().total_seconds())}s late"
    missed = [(at, late) for at in planned if at != run_at]
    if run_at:
        missed = [
            (at, f"{late}; superseded by the run planned at {run_at:%H:%M}Z") for at, _ in missed
        ]
    if skipped:
        log.warning("schedule %s: %d older missed runs not recorded", schedule.pk, skipped)
        if missed:
            missed[0] = (missed[0][0], f"{missed[0][1]} (and {skipped} earlier runs)")
    return _Plan(schedule, devices, run_at, missed, next_run_at, latest)


def _skip_claimed(plans: list[_Plan]) -> int:
    """Drop the planned times another runner has already claimed (one cheap query).

    The unique constraint alone would be enough for correctness; this spares writing commands
    that the claim would then throw away. Their `next_run_at` still moves on (`_advance` is
    idempotent), so a claimer that died does not leave its schedules due forever.
    """
    due = [p for p in plans if p.run_at]
    if not due:
        return 0
    taken = set(
        ScheduleRun.objects.filter(
            schedule_id__in=[p.schedule.pk for p in due],
            planned_at__in={p.run_at for p in due},
        ).values_list("schedule_id", "planned_at")
    )
    skipped = 0
    for p in due:
        if (p.schedule.pk, p.run_at) in taken:
            skipped += len(p.devices)
            p.run_at, p.missed = None, []
    return skipped


def _runs_with_commands(plans: list[_Plan], token: str, now: datetime) -> list[ScheduleRun]:
    """Run rows to claim, each with its command already written (saves an UPDATE per run).

    A refused command (offline "reject", invalid relay) gives a `failed` run without one.
    """
    hold = int(grace().total_seconds())
    issued_at = timezone.now()  # `now` may be a planned instant a moment ahead
    runs: list[ScheduleRun] = []
    for p in plans:
        if not p.run_at:
            continue
        issuer = Issuer.for_schedule(p.schedule)
        for device in p.devices:
            run = ScheduleRun(
                owner_id=p.schedule.owner_id,
                schedule=p.schedule,
                device=device,
                planned_at=p.run_at,
                status=RunStatus.CLAIMED,
                claim=token,
            )
            try:
                run.command = build_command(
                    device,
                    p.schedule.action,
                    issuer=issuer,
                    relay=p.schedule.relay,
                    ttl=hold,
                    now=issued_at,
                )
            except CommandRefused as exc:
                run.status, run.detail, run.executed_at = RunStatus.FAILED, exc.message[:255], now
            else:
                if run.command.status == CommandStatus.QUEUED:
                    run.status, run.executed_at = RunStatus.HELD, now
            runs.append(run)
    Command.objects.bulk_create([r.command for r in runs if r.command is not None], batch_size=500)
    for r in runs:
        if r.command is not None:
            r.command = r.command  # now saved: sets command_id and keeps the cached instance
    return runs


def _record_results(claimed: list[ScheduleRun], report: RunReport) -> None:
    """One UPDATE per outcome (all commands of a pass share their publish time)."""
    groups: dict[tuple[str, str, datetime | None], list[int]] = defaultdict(list)
    for run in claimed:
        command = run.command
        if command.status == CommandStatus.FAILED:
            key = (RunStatus.FAILED, command.detail, command.resolved_at)
            report.failed += 1
        else:
            key = (RunStatus.PUBLISHED, "", command.published_at)
            report.published += 1
        run.status, run.detail, run.executed_at = key
        groups[key].append(run.pk)
    for (status, detail, at), ids in groups.items():
        ScheduleRun.objects.filter(pk__in=ids, status=RunStatus.CLAIMED).update(
            status=status, detail=detail, executed_at=at
        )


def _advance(plans: list[_Plan]) -> None:
    # Compare-and-set: a schedule edited (or advanced by another runner) meanwhile wins.
    # Schedules due at the same instant with the same next run share one UPDATE.
    groups: dict[tuple, list[int]] = defaultdict(list)
    for p in plans:
        key = (p.schedule.next_run_at, p.next_run_at, p.run_at or p.last_planned)
        groups[key].append(p.schedule.pk)
    with transaction.atomic():
        for (old, new, last), ids in groups.items():
            Schedule.objects.filter(pk__in=ids, next_run_at=old).update(
                next_run_at=new, last_run_at=last
            )


def prepare_seconds() -> float:
    return float(getattr(settings, "SCHEDULE_PREPARE_SECONDS", 3.0))


def run_schedules_for(seconds: float, *, sleep=time.sleep) -> RunReport:
    """Run due schedules, then keep waking for the next planned instants for up to `seconds`.

    Celery beat starts this every SCHEDULE_TICK_SECONDS. Runs are claimed and their commands
    written SCHEDULE_PREPARE_SECONDS before the planned instant and published at it, which
    keeps lateness in milliseconds even for a thousand schedules due in the same second. (A
    schedule disabled within that moment still runs once.)
    """
    deadline = time.monotonic() + seconds
    lead = prepare_seconds()
    total = RunReport()
    while True:
        report = run_due_schedules()
        upcoming = Schedule.objects.filter(enabled=True).aggregate(at=Min("next_run_at"))["at"]
        if upcoming is not None and 0 < (upcoming - timezone.now()).total_seconds() <= lead:
            report += run_due_schedules(now=upcoming, publish_at=upcoming, sleep=sleep)
            upcoming = Schedule.objects.filter(enabled=True).aggregate(at=Min("next_run_at"))["at"]
        total += report
        if upcoming is None:
            return total
        until_prepare = (upcoming - timezone.now()).total_seconds() - lead
        left = deadline - time.monotonic()
        if until_prepare > left:
            return total
        if until_prepare <= 0 and not (
            report.published or report.held or report.failed or report.missed
        ):
            until_prepare = 0.05  # claimed by another runner that has not moved it on yet
        # Wake at least every second: a schedule created meanwhile may be due sooner.
        sleep(max(0.0, min(until_prepare, 1.0, left)))


def sweep_runs(now: datetime | None = None, *, stale_after: float = 120.0) -> int:
    """Record the runs a killed runner left `claimed`; never publishes anything."""
    now = now or timezone.now()
    stale = ScheduleRun.objects.filter(
        status=RunStatus.CLAIMED, planned_at__lte=now - timedelta(seconds=stale_after)
    ).select_related("command")
    count = 0
    for run in stale:
        command = run.command
        if command is not None and command.published_at:
            status, detail, at = RunStatus.PUBLISHED, "", command.published_at
        elif command is not None:
            status, at = RunStatus.FAILED, now
            detail = "the runner stopped while publishing; the command may not have gone out"
        else:
            status, at = RunStatus.FAILED, now
            detail = "the runner stopped after claiming this run; nothing was sent"
        count += ScheduleRun.objects.filter(pk=run.pk, status=RunStatus.CLAIMED).update(
            status=status, detail=detail, executed_at=at
        )
    return count
