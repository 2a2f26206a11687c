"""The delivery outbox. PLACEHOLDER: being built (issue 3)."""

from __future__ import annotations

from collections.abc import Sequence

from apps.devices.events import DeviceEvent


def write_outbox(events: Sequence[DeviceEvent]) -> int:
    """Write one delivery per matching enabled destination, in the caller's transaction."""
    return 0
