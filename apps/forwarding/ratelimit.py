"""Per-owner and per-destination delivery rate limits, shared by every worker process.

Fixed one-second windows counted in Django's cache (Redis in production, a file cache in the
embedded mode): coarse, but one cache round trip per claim, and it holds across hosts. A worker
asks for as many rows as it could send and is granted what is left of the second's budget.
"""

from __future__ import annotations

import time

from django.conf import settings
from django.core.cache import cache

from . import kinds


def take(scope: str, wanted: int, limit: int, now: float | None = None) -> int:
    """Reserve up to `wanted` of `limit` units in the current second of `scope`."""
    if wanted <= 0:
        return 0
    window = int(now if now is not None else time.time())
    key = f"forwarding:rate:{scope}:{window}"
    try:
        after = cache.incr(key, wanted)  # one round trip on the usual path
    except ValueError:  # first use of this window (or another worker opens it meanwhile)
        after = wanted if cache.add(key, wanted, timeout=3) else cache.incr(key, wanted)
    before = after - wanted
    return max(0, min(wanted, limit - before))


def grant(config: kinds.TargetConfig, wanted: int) -> int:
    """Rows a destination may take now: `wanted`, within its own and its owner's limits.

    Limits count webhook requests; a kind's `rate_scale` rows make one unit."""
    scale = kinds.KINDS[config.kind].rate_scale
    limit = settings.DELIVERY_DESTINATION_RATE * scale
    if config.rate_limit:
        limit = min(limit, config.rate_limit)
    granted = take(f"d{config.destination_id}", wanted, limit)
    if granted:
        units = take(f"o{config.owner_id}", -(-granted // scale), settings.DELIVERY_OWNER_RATE)
        granted = min(granted, units * scale)
    return granted
