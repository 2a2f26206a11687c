"""Celery tasks of Data Delivery. Thin: ids in, one function call, safe to run twice.

No task carries a secret, a payload or a retry countdown: deliveries and their schedule are
rows (`next_attempt_at`), found by the drain loop and by the periodic sweep.
"""

from __future__ import annotations

import mmap
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from billiard import current_process
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
    with stoppable():
        stats = pipeline.drain(settings.DELIVERY_DRAIN_SECONDS, stop_requested=worker_stopping)
    if stats.budget_spent:
        kick(force=True)  # more may be due: hand over to a fresh task rather than run forever


# --- stopping a worker --------------------------------------------------------------------------
#
# A drain runs for up to DELIVERY_DRAIN_SECONDS. Celery's warm shutdown waits for running tasks,
# so a stop used to wait out a drain's budget; and a SIGTERM to the whole process group (systemd,
# honcho) reaches the prefork children too, where billiard's handler ended the drain mid-batch
# (its rows sent again once their lease ran out, and WorkerLostError in the log). Now a stopping
# worker's drains stop claiming, finish and record what is in flight, and end. No drain task is
# queued for the rest: this worker may still take it while it shuts down; the periodic sweep
# kicks the next worker (and so does ingest).

# One byte of memory shared by a worker's main process and the pool children it forks (an
# anonymous shared mapping, made before the pool starts), set when the main process begins its
# warm shutdown; drain loops read it every DISCOVERY_INTERVAL. None outside a worker.
_stopping: mmap.mmap | None = None


def worker_starting() -> None:
    """In a worker's main process, before its pool forks (`worker_init`)."""
    global _stopping
    _stopping = mmap.mmap(-1, 1)


def worker_stopping() -> bool:
    return _stopping is not None and _stopping[0] == 1


def stop_drains() -> None:
    """In a worker's main process, at its warm shutdown (`worker_shutting_down`): the drains in
    this process's threads (threads pool) stop at once, those in prefork children at their next
    look at the shared flag."""
    if _stopping is not None:
        _stopping[0] = 1
    pipeline.shut_down()


@contextmanager
def stoppable() -> Iterator[None]:
    """While a drain runs in a prefork child, its first SIGTERM (the group's) asks it to stop
    instead of ending the process.

    Installed for the drain only: billiard's own SIGTERM handler (exit, running `finally`
    blocks) covers the rest of the child's life, and a second SIGTERM. Not in the main process,
    where SIGTERM is Celery's own shutdown signal (solo and threads pools)."""
    if current_process().name == "MainProcess":
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    terms = 0

    def on_term(signum: int, frame: Any) -> None:
        nonlocal terms
        terms += 1
        if terms == 1:
            pipeline.shut_down()
            return
        signal.signal(signum, previous)  # a second SIGTERM does what it did before
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
