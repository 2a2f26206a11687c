"""Broker-login actions in the admin, for platform operators (superusers) only (SPEC §2, §9).

Attached in `apps.devices.admin`: "Issue / rotate broker credentials" on devices, "Revoke broker
credentials" on credentials, and a broker sync after an operator edits a credential. Passwords
are never shown here; an operator hands a login over with
`manage.py provision_broker --device ID --secret-file PATH` (docs/operations.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from .broker import BrokerError
from .credentials import (
    CredentialRefused,
    Outcome,
    broker_session,
    issue_credential,
    revoke_credential,
    rotate_credential,
    sync_credential,
)
from .models import Device, DeviceCredential

# Each device costs a few broker round trips inside the request: keep a selection bounded.
MAX_DEVICES = 200


class BrokerLoginAdminMixin:
    """`permissions=["broker"]`: only platform operators manage broker logins."""

    def has_broker_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser


class SyncOnSaveAdminMixin:
    """A credential edited in its form (password, revocation) goes to the broker after commit."""

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)  # type: ignore[misc]
        outcome = sync_credential(obj.device)
        # Runs after the sync (on_commit keeps order): the admin wraps the save in a transaction.
        transaction.on_commit(partial(_report_sync, self, request, outcome))


def _report_sync(modeladmin: Any, request: HttpRequest, outcome: Outcome) -> None:
    if outcome.failed or outcome.broker == "skipped":
        level = messages.ERROR if outcome.failed else messages.WARNING
        text = f"Saved, but the broker was not updated for {outcome.device_id}: {outcome.error}"
    else:
        level = messages.INFO
        text = f"Broker login of {outcome.device_id}: {', '.join(outcome.steps) or 'up to date'}."
    modeladmin.message_user(request, text, level)


def _run(
    modeladmin: Any,
    request: HttpRequest,
    devices: list[Device],
    action: Callable[[Device], Callable[..., Outcome]],
) -> None:
    if len(devices) > MAX_DEVICES:
        modeladmin.message_user(
            request, f"Select at most {MAX_DEVICES} devices at a time.", messages.ERROR
        )
        return
    done: Counter[str] = Counter()
    problems: list[str] = []
    skipped = ""
    try:
        with broker_session() as session:
            for device in devices:
                try:
                    outcome = action(device)(device, admin=session)
                except CredentialRefused as exc:
                    problems.append(str(exc))
                    continue
                done[outcome.change] += 1
                if outcome.failed:
                    problems.append(f"{device.device_id}: broker: {outcome.error}")
                elif outcome.broker == "skipped":
                    skipped = outcome.error
    except BrokerError as exc:
        # Raised before any change: the session connects before the first device.
        modeladmin.message_user(request, f"Nothing changed: {exc}", messages.ERROR)
        return
    summary = ", ".join(f"{change}: {n}" for change, n in sorted(done.items())) or "nothing done"
    modeladmin.message_user(request, f"Broker logins — {summary}.", messages.SUCCESS)
    if skipped:
        modeladmin.message_user(
            request, f"Kept in the database only ({skipped}).", messages.WARNING
        )
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        modeladmin.message_user(request, f"Problems — {shown}", messages.ERROR)


@admin.action(description="Issue / rotate broker credentials", permissions=["broker"])
def issue_or_rotate(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Device]) -> None:
    """A login for devices that have none (or a revoked one); a new password for the others."""
    devices = list(queryset.select_related("owner").order_by("pk")[: MAX_DEVICES + 1])
    active = set(
        DeviceCredential.objects.filter(device__in=devices, revoked_at__isnull=True).values_list(
            "device_id", flat=True
        )
    )
    _run(
        modeladmin,
        request,
        devices,
        lambda d: rotate_credential if d.pk in active else issue_credential,
    )


@admin.action(
    description="Revoke broker credentials (disconnects the devices)", permissions=["change"]
)
def revoke_credentials(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[DeviceCredential]
) -> None:
    devices = [
        c.device for c in queryset.select_related("device__owner").order_by("pk")[: MAX_DEVICES + 1]
    ]
    _run(modeladmin, request, devices, lambda d: revoke_credential)
