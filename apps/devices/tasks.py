"""Celery tasks of the devices app."""

from __future__ import annotations

import logging

from celery import shared_task

from .broker import BrokerError
from .credentials import broker_session, prune

log = logging.getLogger(__name__)


@shared_task(name="devices.prune_logins", ignore_result=True, soft_time_limit=120, time_limit=150)
def prune_logins() -> list[str]:
    """Remove the broker logins (and their roles) that no active credential accounts for: those
    of devices deleted, or credentials revoked, while the broker was down. Periodic (beat, every
    BROKER_PRUNE_MINUTES), so a deleted device cannot keep logging in until someone runs
    `provision_broker --all`. Returns what it did, in words; nothing without a broker admin."""
    try:
        with broker_session() as admin:
            if admin is None:
                return []
            done = prune(admin)
    except BrokerError as exc:
        log.warning("broker logins not pruned (next try on schedule) error=%r", str(exc))
        return []
    for step in done:
        log.info("broker login pruned: %s", step)
    return done
