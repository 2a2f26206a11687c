"""History past its retention: what is kept how long, and the chunked deletes that prune it.

Each app declares its history tables in its `AppConfig.ready()` (`register`); beat runs
`core.prune_history` hourly (`RETENTION_PRUNE_MINUTES`), and operators can run
`manage.py prune_history` (with `--dry-run` to count first).

How a table is pruned, so that pruning never slows ingest down:

- in chunks of CHUNK rows, each its own short transaction: no lock is held for long, and a
  table neglected for months is caught up over several runs rather than in one huge delete;
- through an index the table already has: a policy names the column to scope by (the owner of
  a telemetry row, the status of a schedule run) and the prune walks the scopes, so each
  chunk is an index range scan (`owner_id = … AND received_at < …` on the telemetry's
  `(owner, -received_at)` index). A bare `received_at < …` on a table without an index
  leading with it would scan the whole table every hour. The hottest table gets no new
  index: each costs the listener an entry per message;
- within a time budget per run (`seconds`): what is left is pruned by the next run.

Retention is the platform's, not an owner's: owners keep their data for as long as they like
in their own databases and webhooks (Data Delivery). 0 days keeps a table forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

log = logging.getLogger(__name__)

CHUNK = 5000
DEFAULT_SECONDS = 240.0  # per run; the task's soft limit is above it


@dataclass(frozen=True)
class Policy:
    """How long one table keeps its rows, and how to find the old ones.

    `setting`: the name of the days setting (0 = forever). `time_field`: the row's time.
    `scope_field` / `scopes`: the column the prune walks, and its values (a callable, read at
    prune time), so that each chunk uses an index leading with that column. `keep`: rows never
    pruned whatever their age (e.g. commands still open).
    """

    label: str
    model: type[models.Model]
    time_field: str
    setting: str
    scope_field: str | None = None
    scopes: Callable[[], Iterable[Any]] | None = None
    keep: models.Q | None = None

    @property
    def days(self) -> int:
        return int(getattr(settings, self.setting))

    def cutoff(self, now: datetime) -> datetime | None:
        days = self.days
        return None if days <= 0 else now - timedelta(days=days)

    def old(self, cutoff: datetime, scope: Any = None) -> models.QuerySet:
        # No ordering (the models' default one would sort every old row for each chunk).
        rows = self.model._default_manager.filter(**{f"{self.time_field}__lt": cutoff}).order_by()
        if self.scope_field is not None:
            rows = rows.filter(**{self.scope_field: scope})
        if self.keep is not None:
            rows = rows.exclude(self.keep)
        return rows

    def scope_values(self) -> list[Any]:
        return [None] if self.scopes is None else list(self.scopes())


_policies: dict[str, Policy] = {}


def register(policy: Policy) -> None:
    _policies[policy.label] = policy


def policies() -> list[Policy]:
    return list(_policies.values())


@dataclass
class Pruned:
    """What a run did (or, dry, would do): rows per table, and whether it got to the end."""

    deleted: dict[str, int] = field(default_factory=dict)
    complete: bool = True

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


def prune(
    now: datetime | None = None,
    *,
    seconds: float = DEFAULT_SECONDS,
    chunk: int = CHUNK,
    dry_run: bool = False,
    only: Iterable[str] | None = None,
) -> Pruned:
    """Delete every registered table's rows past its retention, table by table.

    At least one chunk per table and scope is deleted; after `seconds` the run stops and
    reports `complete=False` (the next run goes on). `dry_run` counts instead of deleting.
    """
    now = now or timezone.now()
    deadline = time.monotonic() + seconds
    result = Pruned()
    wanted = set(only) if only is not None else None
    for policy in policies():
        if wanted is not None and policy.label not in wanted:
            continue
        cutoff = policy.cutoff(now)
        if cutoff is None:
            continue
        deleted = 0
        for scope in policy.scope_values():
            if dry_run:
                deleted += policy.old(cutoff, scope).count()
                continue
            while True:
                n = _delete_chunk(policy, cutoff, scope, chunk)
                deleted += n
                if n < chunk:
                    break
                if time.monotonic() > deadline:
                    result.complete = False
                    break
            if not result.complete:
                break
        result.deleted[policy.label] = deleted
        if deleted and not dry_run:
            log.info(
                "retention: deleted %d %s rows older than %s days", deleted, policy.label,
                policy.days,
            )  # fmt: skip
        if not result.complete:
            log.info("retention: time budget spent; the next run goes on")
            break
    return result


def _delete_chunk(policy: Policy, cutoff: datetime, scope: Any, chunk: int) -> int:
    """One short transaction: the ids of up to `chunk` old rows, then their deletion (through
    the ORM, so that relations declared in Django are honoured: a deleted command's schedule
    run keeps its row, its `command` set to null)."""
    with transaction.atomic():
        ids = list(policy.old(cutoff, scope).values_list("pk", flat=True)[:chunk])
        if not ids:
            return 0
        policy.model._default_manager.filter(pk__in=ids).delete()
    return len(ids)
