"""Celery tasks of Data Delivery. Thin: ids in, one function call, safe to run twice.

No task carries a secret, a payload or a retry countdown: deliveries and their schedule are
rows (`next_attempt_at`), found by the drain loop and by the periodic sweep.
"""

from __future__ import annotations

from celery import shared_task
from django.conf import settings
from django.core.cache import cache

from . import actions, pipeline
from .models import Destination
from .webhook.models import MAX_TIMEOUT

KICK_KEY = "forwarding:kick"
KICK_EVERY = 1  # seconds; a running drain loop picks up rows written in between


def kick(force: bool = False) -> None:
    """Ask for a drain task, at most one per KICK_EVERY seconds across processes."""
    if force or cache.add(KICK_KEY, 1, timeout=KICK_EVERY):
        drain.apply_async(queue=settings.DELIVERY_QUEUE)


@shared_task(
    name="forwarding.drain",
    ignore_result=True,
    # The budget, then up to one request deadline to finish what is in flight.
    soft_time_limit=settings.DELIVERY_DRAIN_SECONDS + 2 * MAX_TIMEOUT + 30,
    time_limit=settings.DELIVERY_DRAIN_SECONDS + 2 * MAX_TIMEOUT + 60,
)
def drain() -> None:
    stats = pipeline.drain(settings.DELIVERY_DRAIN_SECONDS)
    if stats.budget_spent:
        kick(force=True)  # more may be due: hand over to a fresh task rather than run forever


@shared_task(name="forwarding.sweep", ignore_result=True, time_limit=120)
def sweep() -> None:
    actions.sweep()


@shared_task(
    name="forwarding.test_destination",
    ignore_result=True,
    # Both limits: a soft limit above the hard one (the settings' default) makes .delay() fail.
    soft_time_limit=MAX_TIMEOUT + 20,
    time_limit=MAX_TIMEOUT + 30,
)
def test_destination(owner_id: int, destination_id: int) -> None:
    # The owner id is part of the lookup: an id of another owner's destination finds nothing.
    destination = Destination.objects.filter(owner_id=owner_id, pk=destination_id).first()
    if destination is not None:
        actions.test_destination(destination)
