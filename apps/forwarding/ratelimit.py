"""Per-owner and per-destination delivery rate limits, shared by every worker process.

Fixed one-second windows counted in Django's cache (Redis in production, a file cache in the
embedded mode): coarse, but one cache round trip per claim, and it holds across hosts. A worker
asks for as many rows as it could send and is granted what is left of the second's budget.
"""

from __future__ import annotations

import time

from django.core.cache import cache


def take(scope: str, wanted: int, limit: int, now: float | None = None) -> int:
    """Reserve up to `wanted` of `limit` units in the current second of `scope`."""
    if wanted <= 0:
        return 0
    window = int(now if now is not None else time.time())
    key = f"forwarding:rate:{scope}:{window}"
    cache.add(key, 0, timeout=3)
    try:
        after = cache.incr(key, wanted)
    except ValueError:  # expired between add and incr: start the window again
        cache.set(key, wanted, timeout=3)
        after = wanted
    before = after - wanted
    return max(0, min(wanted, limit - before))
