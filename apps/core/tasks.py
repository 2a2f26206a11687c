"""Celery tasks of the core app."""

from __future__ import annotations

from celery import shared_task

from . import retention


@shared_task(name="core.prune_history", ignore_result=True, soft_time_limit=300, time_limit=360)
def prune_history() -> dict[str, int]:
    """Delete history past its retention (`apps.core.retention`); hourly, from beat. A run
    stops after retention.DEFAULT_SECONDS; the next one goes on where it stopped."""
    return retention.prune().deleted
