"""Commands to devices. PLACEHOLDER: being built (issue 5). The listener calls `after_ingest`."""

from __future__ import annotations

from collections.abc import Sequence

from .events import DeviceEvent


def after_ingest(events: Sequence[DeviceEvent]) -> None:
    """Called by the listener inside each batch transaction with the batch's events."""
    return None
