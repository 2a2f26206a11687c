"""The live pages: dashboard and device page, server-rendered, then kept current by live.js.

Both pages render from `live.device_state()`, the same dict the WebSocket sends, so the first
paint and every later update show the same fields the same way (`static/js/live.js` mirrors
the small formatting helpers below).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from apps.owners.models import Role
from apps.owners.scoping import get_for_user_or_404, has_role, scope

from . import commands, live
from .models import Device, EventKind, Profile, Telemetry

# Units of readings as devices send them (docs/protocols.md): Tasmota reports W, meter-v2 kW.
UNITS = {
    "voltage": "V",
    "current": "A",
    "power": "W",
    "reactive_power": "var",
    "apparent_power": "VA",
    "energy": "kWh",
    "energy_export": "kWh",
    "frequency": "Hz",
    "temperature": "°C",
}
PROFILE_UNITS = {
    Profile.METER_V2: {"power": "kW", "reactive_power": "kvar", "apparent_power": "kVA"},
}
# Large values step up a prefix (1,500 kW -> 1.5 MW), as people read meters.
PREFIX_LADDERS = [
    ["W", "kW", "MW", "GW"],
    ["var", "kvar", "Mvar", "Gvar"],
    ["VA", "kVA", "MVA", "GVA"],
    ["Wh", "kWh", "MWh", "GWh"],
]
# Shown first on a tile when present; other readings fill the remaining cards.
TILE_FIRST = ("voltage", "current", "power", "energy")
TILE_READINGS = 4
CHART_WINDOW = timedelta(hours=2)
CHART_POINTS = 300
RECENT_TRANSITIONS = 20
COMMAND_ACTIONS = ("ON", "OFF", "TOGGLE")


def format_number(value: float) -> str:
    """Up to two decimals, no trailing zeros (live.js `formatNumber` does the same)."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def ago(then: datetime | None, now: datetime | None = None) -> str:
    """ "12 s ago", "5 min ago" (live.js `ago` does the same and keeps it ticking)."""
    if then is None:
        return "never"
    seconds = max(0, int(((now or timezone.now()) - then).total_seconds()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def scaled(name: str, value: float, profile: str = "") -> tuple[str, str]:
    """A reading as text and unit, with a larger prefix for large values (live.js `scaled`)."""
    unit = PROFILE_UNITS.get(profile, {}).get(name) or UNITS.get(name, "")
    for ladder in PREFIX_LADDERS:
        if unit in ladder:
            step = ladder.index(unit)
            while abs(value) >= 1000 and step + 1 < len(ladder):
                value, step = value / 1000, step + 1
            unit = ladder[step]
    return format_number(value), unit


def tile_readings(values: dict[str, float]) -> list[tuple[str, float]]:
    first = [(k, values[k]) for k in TILE_FIRST if k in values]
    rest = [(k, v) for k, v in values.items() if k not in TILE_FIRST]
    return (first + rest)[:TILE_READINGS]


def reading_items(state: dict[str, Any], *, info: bool = True) -> list[dict[str, str]]:
    """The small cards of a tile: readings first, then (`info`) signal and firmware.

    live.js `readingItems` does the same; the device page lists signal and firmware as facts.
    """
    items = []
    for name, value in tile_readings(live.chart_values(state["last_reading"])):
        text, unit = scaled(name, value, state["profile"])
        items.append({"name": name.replace("_", " "), "value": text, "unit": unit})
    if not info:
        return items
    if state["rssi"] is not None and len(items) < TILE_READINGS:
        items.append({"name": "signal", "value": str(state["rssi"]), "unit": "dBm"})
    if state["firmware"] and len(items) < TILE_READINGS:
        items.append({"name": "firmware", "value": state["firmware"], "unit": ""})
    return items


def tile(device: Device, now: datetime | None = None, *, info: bool = True) -> dict[str, Any]:
    """`device_state` plus what a template cannot compute itself."""
    state = live.device_state(device)
    return {
        **state,
        "relay_states": [
            {"index": n, "state": state["power"].get(str(n), "")} for n in state["relays"]
        ],
        "readings": reading_items(state, info=info),
        "last_seen_text": ago(device.last_seen_at, now),
    }


def _can_command(request: HttpRequest, owner_id: int) -> bool:
    return has_role(request.user, owner_id, Role.OPERATOR)


def _command_context() -> dict[str, Any]:
    return {"command_actions": COMMAND_ACTIONS}


def _admin_url(request: HttpRequest, device: Device) -> str:
    if not request.user.is_staff:
        return ""
    try:
        return reverse("admin:devices_device_change", args=[device.pk])
    except NoReverseMatch:  # the device admin is not registered
        return ""


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    devices = list(
        scope(Device.objects.select_related("owner"), request.user).order_by(
            "owner__name", "owner_id", "device_id"
        )[: live.SNAPSHOT_LIMIT]
    )
    now = timezone.now()
    sections = [
        {
            "owner": owner,
            "tiles": [tile(d, now) for d in group],
            "can_command": _can_command(request, owner.pk),
        }
        for owner, group in groupby(devices, key=lambda d: d.owner)
    ]
    return render(
        request,
        "devices/dashboard.html",
        {
            "sections": sections,
            "device_count": len(devices),
            "truncated": len(devices) >= live.SNAPSHOT_LIMIT,
            "page": "dashboard",
            **_command_context(),
        },
    )


@login_required
def device_detail(request: HttpRequest, device_id: str) -> HttpResponse:
    device = get_for_user_or_404(
        Device.objects.select_related("owner"), request.user, device_id=device_id
    )
    since = timezone.now() - CHART_WINDOW
    rows = (
        Telemetry.objects.filter(device=device, kind=EventKind.TELEMETRY, ts__gte=since)
        .order_by("-ts")
        .values_list("ts", "data")[:CHART_POINTS]
    )
    points = [p for ts, data in reversed(rows) if (p := live.chart_point(ts, data))]
    transitions = device.transitions.all()[:RECENT_TRANSITIONS]
    return render(
        request,
        "devices/device_detail.html",
        {
            "device": device,
            "t": tile(device, info=False),
            "transitions": transitions,
            "chart_points": points,
            "can_command": _can_command(request, device.owner_id),
            "admin_url": _admin_url(request, device),
            "page": "device",
            **_command_context(),
        },
    )


REFUSAL_STATUS = {
    commands.CommandRefused.FORBIDDEN: 403,
    commands.CommandRefused.OFFLINE: 409,
    commands.CommandRefused.INVALID: 400,
}


def _error(status: int, error: str, detail: str) -> JsonResponse:
    return JsonResponse({"error": error, "detail": detail}, status=status)


@login_required
@require_POST
def device_command(request: HttpRequest, device_id: str) -> HttpResponse:
    """Switch a relay from the live pages: `{"action": "ON"|"OFF"|"TOGGLE", "relay": n}`.

    Answers 202 with the command's id and status (`published`, `queued`, `failed`); its
    confirmation reaches the page as a live `command` message. CSRF-protected like any POST.
    """
    device = get_for_user_or_404(Device.objects.all(), request.user, device_id=device_id)
    if not _can_command(request, device.owner_id):
        return _error(403, "forbidden", "Only operators, admins and owners may switch devices.")
    if request.content_type == "application/json":
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return _error(400, "invalid", "The request body is not JSON.")
    else:
        body = request.POST
    if not hasattr(body, "get"):
        return _error(400, "invalid", "The request body must be a JSON object.")
    relay = body.get("relay")
    if relay in (None, ""):
        relay = None
    else:
        try:
            relay = int(relay)
        except (TypeError, ValueError):
            return _error(400, "invalid", "Relay must be a number.")
    try:
        command = commands.execute_command(
            device=device, action=str(body.get("action", "")), relay=relay, issuer=request.user
        )
    except commands.CommandRefused as refused:
        return _error(REFUSAL_STATUS.get(refused.code, 400), refused.code, refused.message)
    return JsonResponse(
        {
            "command_id": str(command.request_id),
            "status": command.status,
            "detail": command.detail,
            "action": command.action,
            "relay": command.relay,
        },
        status=202,
    )
