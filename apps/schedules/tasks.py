"""Celery tasks for lamp control. Thin: each calls one function; all are safe to run twice.

Beat starts `schedules.run_due` every SCHEDULE_TICK_SECONDS and `commands.sweep` every
COMMAND_SWEEP_SECONDS (periodic tasks created by migration 0002 of this app).
"""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from apps.devices import commands

from . import actions


def tick_seconds() -> float:
    return float(getattr(settings, "SCHEDULE_TICK_SECONDS", 2))


@shared_task(name="schedules.run_due", ignore_result=True, soft_time_limit=30, time_limit=40)
def run_due_schedules() -> None:
    actions.run_schedules_for(tick_seconds())


@shared_task(name="commands.sweep", ignore_result=True, soft_time_limit=30, time_limit=40)
def sweep_commands() -> None:
    commands.sweep()
    actions.sweep_runs()


@shared_task(name="commands.send_held", ignore_result=True, soft_time_limit=30, time_limit=40)
def send_held_commands(device_pks: list[int]) -> None:
    commands.send_held_commands(device_pks)
