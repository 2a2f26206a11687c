"""A populated world for API tests: one of every API-visible object, for alice and charlie.

Every object of charlie's carries "charlie" in its names or ids, and none of alice's does, so a
list answer that mentions "charlie" has leaked a row.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from apps.devices.models import (
    Command,
    CommandStatus,
    Device,
    EventKind,
    IssuerType,
    Profile,
    Telemetry,
    Transition,
)
from apps.forwarding.models import Attempt, Delivery, Outcome, Status
from apps.forwarding.webhook.models import WebhookDestination, WebhookHeader
from apps.owners.models import Owner
from apps.schedules.models import DeviceGroup, RunStatus, Schedule, ScheduleRun


@dataclass
class Side:
    owner: Owner
    lamp: Device
    meter: Device
    telemetry: Telemetry
    transition: Transition
    command: Command
    group: DeviceGroup
    schedule: Schedule
    run: ScheduleRun
    webhook: WebhookDestination
    delivery: Delivery
    attempt: Attempt

    def ids(self) -> dict[str, str]:
        """URL values of this side's objects, by what the route's placeholder refers to."""
        return {
            "device": self.lamp.device_id,
            "command": str(self.command.request_id),
            "group": str(self.group.pk),
            "schedule": str(self.schedule.pk),
            "destination": str(self.webhook.uuid),
            "delivery": str(self.delivery.pk),
        }


def build_side(owner: Owner, name: str) -> Side:
    now = timezone.now()
    lamp = Device.objects.create(
        owner=owner,
        device_id=f"{name}-lamp-{uuid.uuid4().hex[:6]}",
        name=f"{name} lamp",
        profile=Profile.ESP32_LAMP,
    )
    meter = Device.objects.create(
        owner=owner,
        device_id=f"{name}-meter-{uuid.uuid4().hex[:6]}",
        name=f"{name} meter",
        profile=Profile.METER_V2,
    )
    telemetry = Telemetry.objects.create(
        owner=owner,
        device=meter,
        kind=EventKind.TELEMETRY,
        ts=now - timedelta(minutes=1),
        received_at=now,
        topic=f"iot/{meter.device_id}/telemetry",
        data={"voltage": 230.5, "source": f"{name}-reading"},
    )
    transition = Transition.objects.create(
        owner=owner,
        device=lamp,
        kind="connection",
        old="unknown",
        new="online",
        cause=f"{name}-lwt",
        at=now,
    )
    command = Command.objects.create(
        owner=owner,
        device=lamp,
        action="ON",
        relay=1,
        expected="ON",
        issuer_type=IssuerType.SYSTEM,
        issuer_label=f"{name}-system",
        status=CommandStatus.CONFIRMED,
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
    )
    group = DeviceGroup.objects.create(owner=owner, name=f"{name} group")
    group.devices.add(lamp)
    schedule = Schedule.objects.create(
        owner=owner,
        name=f"{name} evening",
        device=lamp,
        action="ON",
        cron="0 18 * * *",
        timezone="Europe/Berlin",
    )
    run = ScheduleRun.objects.create(
        owner=owner,
        schedule=schedule,
        device=lamp,
        planned_at=now - timedelta(hours=1),
        executed_at=now - timedelta(hours=1),
        status=RunStatus.PUBLISHED,
        claim=f"{name}claim",
    )
    webhook = WebhookDestination(
        owner=owner, name=f"{name} hook", url=f"https://{name}.example.net/hook"
    )
    webhook.save()
    WebhookHeader(destination=webhook, name="X-Owner", value=f"{name}-header").save()
    WebhookHeader(destination=webhook, name="Authorization", secret_value=f"{name}-token").save()
    delivery = Delivery.objects.create(
        owner=owner,
        destination=webhook,
        event_id=f"tel_{telemetry.pk}",
        event_type="telemetry",
        device=meter.device_id,
        message_id=f"msg_{name}_{telemetry.pk}",
        payload={"type": "telemetry", "data": {"from": f"{name}-payload"}},
        status=Status.FAILED,
        attempts=1,
        last_error="HTTP 500",
    )
    attempt = Attempt.objects.create(
        owner=owner,
        destination=webhook,
        delivery=delivery,
        number=1,
        started_at=now,
        duration_ms=12,
        outcome=Outcome.FAILED,
        status_code=500,
        response=f"{name}-response",
    )
    return Side(
        owner,
        lamp,
        meter,
        telemetry,
        transition,
        command,
        group,
        schedule,
        run,
        webhook,
        delivery,
        attempt,
    )
