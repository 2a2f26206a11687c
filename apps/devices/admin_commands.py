"""Device list actions: switch a selection of devices ON or OFF (every relay of each).

Attached to DeviceAdmin at the end of `apps.devices.admin`. The action needs the operator role
(`permissions=["operate"]`); each device is checked again by `execute_command`, so a member who
operates one owner and only views another switches only the first one's devices.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from .commands import CommandRefused, Issuer, execute_command
from .models import Device, Profile

# A selection is switched synchronously (each publish waits for its PUBACK): keep it bounded.
MAX_DEVICES = 500


def _switch(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Device], action: str) -> None:
    issuer = Issuer.for_user(request.user)
    devices = list(queryset.exclude(profile=Profile.METER_V2).order_by("pk")[: MAX_DEVICES + 1])
    if len(devices) > MAX_DEVICES:
        modeladmin.message_user(
            request, f"Select at most {MAX_DEVICES} devices at a time.", messages.ERROR
        )
        return
    results: Counter[str] = Counter()
    refused: list[str] = []
    for device in devices:
        for relay in device.relays():
            try:
                command = execute_command(device=device, action=action, relay=relay, issuer=issuer)
            except CommandRefused as exc:
                refused.append(f"{device}: {exc.message}")
                break
            results[command.status] += 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(results.items())) or "nothing sent"
    level = messages.SUCCESS if results and not refused else messages.WARNING
    modeladmin.message_user(request, f"{action}: {summary}.", level)
    if refused:
        more = f"; and {len(refused) - 10} more" if len(refused) > 10 else ""
        shown = "; ".join(refused[:10]) + more
        modeladmin.message_user(request, f"Refused — {shown}", messages.ERROR)
    if queryset.filter(profile=Profile.METER_V2).exists():
        modeladmin.message_user(request, "Meters were skipped: they have no switch.", messages.INFO)


@admin.action(description="Switch ON (all relays)", permissions=["operate"])
def switch_on(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Device]) -> None:
    _switch(modeladmin, request, queryset, "ON")


@admin.action(description="Switch OFF (all relays)", permissions=["operate"])
def switch_off(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Device]) -> None:
    _switch(modeladmin, request, queryset, "OFF")


SWITCH_ACTIONS = (switch_on, switch_off)
