"""Periodic housekeeping (beat entry created by migration 0002 of this app)."""

from __future__ import annotations

from celery import shared_task

from . import actions


@shared_task(name="api.cleanup", ignore_result=True, soft_time_limit=60, time_limit=90)
def cleanup() -> None:
    actions.cleanup()
