"""State changes of API keys, and the housekeeping of idempotency records and rate counters."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.db import transaction
from django.utils import timezone

from apps.owners.models import Owner

from . import keys, ratelimit
from .idempotency import ttl
from .models import ALL_SCOPES, ApiKey, IdempotencyRecord

log = logging.getLogger(__name__)


class InvalidScopes(ValueError):
    pass


def clean_scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted(set(scopes))
    unknown = [s for s in chosen if s not in ALL_SCOPES]
    if unknown:
        raise InvalidScopes(f"unknown scopes: {', '.join(unknown)}")
    return chosen


@transaction.atomic
def create_api_key(
    owner: Owner, name: str, scopes: Iterable[str], *, created_by: Any = None
) -> tuple[ApiKey, str]:
    """A new key and its token. The token exists only in the return value: show it once."""
    token = keys.generate()
    key = ApiKey.objects.create(
        owner=owner,
        name=name,
        scopes=clean_scopes(scopes),
        prefix=keys.shown_prefix(token),
        digest=keys.digest(token),
        created_by=created_by if getattr(created_by, "pk", None) else None,
    )
    log.info("api key created owner=%s key=%s prefix=%s", owner.pk, key.pk, key.prefix)
    return key, token


def revoke_api_key(key: ApiKey, *, by: Any = None) -> bool:
    """Revoke at once: every request looks the key up, so the next one is refused."""
    now = timezone.now()
    changed = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(
        revoked_at=now, revoked_by=by if getattr(by, "pk", None) else None
    )
    if changed:
        key.revoked_at = now
        log.info("api key revoked owner=%s key=%s", key.owner_id, key.pk)
    return bool(changed)


def cleanup(now: Any = None) -> tuple[int, int]:
    """Delete idempotency records past their TTL and rate windows that have ended."""
    now = now or timezone.now()
    records = IdempotencyRecord.objects.filter(created_at__lt=now - ttl()).delete()[0]
    counters = ratelimit.delete_expired(now.timestamp())
    return records, counters
