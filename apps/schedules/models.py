"""Schedules: cron in an owner's time zone that switch lamps, and the record of every run.

State changes go through `apps.schedules.actions` (save, enable/disable, the runner); models
own validation and derived values only.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone as dj_timezone

from apps.devices.models import Command, Device, Profile
from apps.owners.models import Owner

from . import cron

SWITCH_ACTIONS = [("ON", "On"), ("OFF", "Off"), ("TOGGLE", "Toggle")]
SWITCHABLE_PROFILES = (Profile.ESP32_LAMP, Profile.TASMOTA)


def max_per_device() -> int:
    return int(getattr(settings, "SCHEDULE_MAX_PER_DEVICE", 20))


class DeviceGroup(models.Model):
    """A named set of an owner's devices that schedules can switch together."""

    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="device_groups")
    name = models.CharField(max_length=120)
    devices = models.ManyToManyField(Device, related_name="schedule_groups", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="unique_group_name_per_owner")
        ]

    def __str__(self) -> str:
        return self.name


class Schedule(models.Model):
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="schedules")
    name = models.CharField(max_length=120)
    # Exactly one target: a device, or a group of devices.
    device = models.ForeignKey(
        Device, null=True, blank=True, on_delete=models.CASCADE, related_name="schedules"
    )
    group = models.ForeignKey(
        DeviceGroup, null=True, blank=True, on_delete=models.CASCADE, related_name="schedules"
    )
    action = models.CharField(max_length=8, choices=SWITCH_ACTIONS)
    relay = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Tasmota relay (1–8); empty means relay 1."
    )
    cron = models.CharField(
        "cron expression",
        max_length=100,
        help_text="Five fields: minute hour day-of-month month day-of-week, e.g. 30 18 * * 1-5.",
    )
    timezone = models.CharField(
        "time zone", max_length=64, help_text="IANA name, e.g. Europe/Berlin."
    )
    enabled = models.BooleanField(default=True)
    starts_on = models.DateField(null=True, blank=True, help_text="First local date it may run.")
    ends_on = models.DateField(null=True, blank=True, help_text="Last local date it may run.")
    next_run_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_run_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(device__isnull=False, group__isnull=True)
                | Q(device__isnull=True, group__isnull=False),
                name="schedule_has_one_target",
            )
        ]
        indexes = [models.Index(fields=["enabled", "next_run_at"])]

    def __str__(self) -> str:
        return self.name

    # --- derived --------------------------------------------------------------------------

    def parsed(self) -> cron.Cron:
        return cron.parse(self.cron)

    def zone(self):
        return cron.get_zone(self.timezone)

    def compute_next_run(self, after: datetime) -> datetime | None:
        """The first run strictly after `after` (UTC), or None when the schedule has ended."""
        occ = cron.next_run(
            self.parsed(), self.zone(), after, starts_on=self.starts_on, ends_on=self.ends_on
        )
        return occ.at if occ else None

    def targets(self) -> list[Device]:
        if self.device_id:
            return [self.device]
        return list(self.group.devices.order_by("pk")) if self.group_id else []

    @property
    def target_label(self) -> str:
        return str(self.device) if self.device_id else f"group {self.group}"

    # --- validation -----------------------------------------------------------------------

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}

        def add(field: str, message: str) -> None:
            errors.setdefault(field, []).append(message)

        parsed = None
        try:
            parsed = cron.parse(self.cron or "")
            self.cron = parsed.expression
        except cron.CronError as exc:
            add("cron", str(exc))
        zone = None
        try:
            zone = cron.get_zone(self.timezone or "")
        except cron.CronError as exc:
            add("timezone", str(exc))
        if self.starts_on and self.ends_on and self.ends_on < self.starts_on:
            add("ends_on", "The end date is before the start date.")
        if parsed and zone and not cron.next_run(parsed, zone, dj_timezone.now()):
            add("cron", "This expression never matches a date (e.g. 31 February).")

        if bool(self.device_id) == bool(self.group_id):
            add("device", "Choose a device or a group (exactly one).")
        targets = []
        if self.device_id:
            targets = [self.device]
        elif self.group_id and self.group.pk:
            targets = list(self.group.devices.all())
        owner_id = self.owner_id
        for target in targets:
            field = "device" if self.device_id else "group"
            if owner_id and target.owner_id != owner_id:
                add(field, f"{target} belongs to another owner.")
            if target.profile not in SWITCHABLE_PROFILES:
                add(field, f"{target} is a {target.get_profile_display()}: it has no switch.")
            elif self.relay and self.relay > target.relay_count:
                add("relay", f"{target} has {target.relay_count} relay(s).")
        if self.group_id and owner_id and self.group.owner_id != owner_id:
            add("group", "This group belongs to another owner.")
        if self.relay is not None and not 1 <= self.relay <= 8:
            add("relay", "Relay must be between 1 and 8.")
        if not errors:
            self._check_limit(targets, add)
        if errors:
            raise ValidationError(errors)

    def _check_limit(self, targets: list[Device], add) -> None:
        limit = max_per_device()
        for target in targets:
            count = (
                Schedule.objects.filter(Q(device=target) | Q(group__devices=target))
                .exclude(pk=self.pk)
                .distinct()
                .count()
            )
            if count >= limit:
                field = "device" if self.device_id else "group"
                add(field, f"{target} already has {count} schedules (at most {limit} per device).")


class RunStatus(models.TextChoices):
    CLAIMED = "claimed", "Claimed (publishing)"
    PUBLISHED = "published", "Published"
    HELD = "held", "Held for an offline device"
    FAILED = "failed", "Failed"
    MISSED = "missed", "Missed"


class ScheduleRun(models.Model):
    """One (schedule, device, planned time): inserted before anything is published.

    The unique constraint is the claim: of several runners (or a runner restarted after a
    crash) only the one whose INSERT created the row publishes. `claim` names that runner.
    """

    id = models.BigAutoField(primary_key=True)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="+")
    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="runs")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="schedule_runs")
    planned_at = models.DateTimeField()
    executed_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=12, choices=RunStatus.choices)
    detail = models.CharField(max_length=255, blank=True)
    command = models.OneToOneField(
        Command, null=True, blank=True, on_delete=models.SET_NULL, related_name="schedule_run"
    )
    claim = models.CharField(max_length=32, db_index=True)

    class Meta:
        ordering = ["-planned_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["schedule", "device", "planned_at"], name="one_run_per_planned_time"
            )
        ]
        indexes = [
            models.Index(fields=["schedule", "-planned_at"]),
            models.Index(fields=["device", "-planned_at"]),
            models.Index(fields=["status", "planned_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.schedule_id}@{self.planned_at:%Y-%m-%d %H:%M}Z {self.status}"

    @property
    def lateness(self) -> timedelta | None:
        return self.executed_at - self.planned_at if self.executed_at else None
