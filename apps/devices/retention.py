"""The devices app's history tables and how long they are kept (see apps.core.retention).

Each policy walks an index its table already has: telemetry by owner on (owner, -received_at),
transitions by device on (device, -at), quarantine on received_at, commands by owner on
(owner, -issued_at).
"""

from __future__ import annotations

from django.db.models import Q

from apps.core.retention import Policy, register
from apps.owners.models import Owner

from .models import Command, Device, QuarantinedMessage, Telemetry, Transition


def _owners() -> list[int]:
    return list(Owner.objects.order_by("pk").values_list("pk", flat=True))


def _devices() -> list[int]:
    return list(Device.objects.order_by("pk").values_list("pk", flat=True))


def register_tables() -> None:
    register(
        Policy(
            "telemetry", Telemetry, "received_at", "TELEMETRY_RETENTION_DAYS", "owner_id", _owners
        )
    )
    register(
        Policy("transitions", Transition, "at", "HISTORY_RETENTION_DAYS", "device_id", _devices)
    )
    register(Policy("quarantine", QuarantinedMessage, "received_at", "QUARANTINE_RETENTION_DAYS"))
    # Open commands (held for an offline device, awaiting confirmation) are state, not history.
    register(
        Policy(
            "commands", Command, "issued_at", "HISTORY_RETENTION_DAYS", "owner_id", _owners,
            keep=Q(status__in=Command.OPEN),
        )
    )  # fmt: skip
