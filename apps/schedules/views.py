"""What the Schedules tab (IoT Owners page) and the device page's schedules card show.

Both are reached through an already scoped object (the owner from OwnerAdmin.get_object, the
device from the device page's `get_for_user_or_404`), so every query here filters by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from django.db.models import Q
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone

from apps.devices.models import Device
from apps.owners.models import Owner, Role
from apps.owners.scoping import has_role

from . import cron
from .models import Schedule, ScheduleRun

NEXT_RUNS = 3
RECENT_RUNS = 20
TAB_SCHEDULES = 200


def preview_rows(
    expression: str, zone_name: str, starts_on: date | None = None, ends_on: date | None = None
) -> tuple[list[cron.PreviewRow], list[str], Any]:
    """(next 10 runs, errors, zone) for a schedule being edited; errors instead of raising."""
    errors, parsed, zone = [], None, None
    try:
        parsed = cron.parse(expression)
    except cron.CronError as exc:
        errors.append(str(exc))
    try:
        zone = cron.get_zone(zone_name)
    except cron.CronError as exc:
        errors.append(str(exc))
    if errors or parsed is None or zone is None:
        return [], errors, zone
    rows = cron.preview(parsed, zone, timezone.now(), starts_on=starts_on, ends_on=ends_on)
    if not rows:
        errors.append("No run within its dates.")
    return rows, errors, zone


@dataclass
class ScheduleRow:
    schedule: Schedule
    next_runs: list[cron.PreviewRow]
    change_url: str
    toggle_url: str


def _rows(schedules: list[Schedule], *, can_toggle: bool) -> list[ScheduleRow]:
    now = timezone.now()
    rows = []
    for s in schedules:
        next_runs: list[cron.PreviewRow] = []
        if s.enabled:
            try:
                next_runs = cron.preview(
                    s.parsed(),
                    s.zone(),
                    now,
                    count=NEXT_RUNS,
                    starts_on=s.starts_on,
                    ends_on=s.ends_on,
                )
            except cron.CronError:
                next_runs = []
        rows.append(
            ScheduleRow(
                schedule=s,
                next_runs=next_runs,
                change_url=reverse("admin:schedules_schedule_change", args=[s.pk]),
                toggle_url=reverse("admin:schedules_schedule_enabled", args=[s.pk])
                if can_toggle
                else "",
            )
        )
    return rows


def _recent_runs(runs: Any) -> list[ScheduleRun]:
    return list(runs.select_related("schedule", "device", "command")[:RECENT_RUNS])


def owner_schedules_context(request: HttpRequest, owner: Owner) -> dict[str, Any]:
    schedules = list(
        Schedule.objects.filter(owner=owner).select_related("device", "group")[:TAB_SCHEDULES]
    )
    operator = has_role(request.user, owner.pk, Role.OPERATOR)
    in_owner = f"?owner__id__exact={owner.pk}"
    return {
        "schedule_rows": _rows(schedules, can_toggle=operator),
        "total": Schedule.objects.filter(owner=owner).count(),
        "runs": _recent_runs(ScheduleRun.objects.filter(owner=owner)),
        "changelist_url": reverse("admin:schedules_schedule_changelist") + in_owner,
        "runs_url": reverse("admin:schedules_schedulerun_changelist") + in_owner,
        "add_url": f"{reverse('admin:schedules_schedule_add')}?owner={owner.pk}"
        if has_role(request.user, owner.pk, Role.ADMIN)
        else "",
        "next": request.get_full_path() + "#schedules",
    }


def device_schedules_context(user: Any, device: Device, next_url: str = "") -> dict[str, Any]:
    schedules = list(
        Schedule.objects.filter(owner_id=device.owner_id)
        .filter(Q(device=device) | Q(group__devices=device))
        .select_related("device", "group")
        .distinct()
    )
    operator = has_role(user, device.owner_id, Role.OPERATOR)
    return {
        "device": device,
        "schedule_rows": _rows(schedules, can_toggle=operator),
        "runs": _recent_runs(ScheduleRun.objects.filter(owner_id=device.owner_id, device=device)),
        "add_url": f"{reverse('admin:schedules_schedule_add')}?owner={device.owner_id}"
        f"&device={device.pk}"
        if has_role(user, device.owner_id, Role.ADMIN)
        else "",
        "next": next_url,
    }
