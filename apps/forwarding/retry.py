"""Retry schedules. The delay lives in the row's `next_attempt_at`, never in a broker countdown.

Defaults approximate the Standard Webhooks schedule (now, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
10 h): 8 attempts, 5 s initial delay, factor 6, capped at 10 h gives 5 s, 30 s, 3 min, 18 min,
1.8 h, 10 h, 10 h — about 23 hours of trying. Owners may change each knob within LIMITS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_INITIAL_DELAY = 5
DEFAULT_BACKOFF_FACTOR = 6.0
DEFAULT_MAX_DELAY = 10 * 3600

# (min, max) that owners' overrides are held to.
LIMITS = {
    "max_attempts": (1, 15),
    "initial_delay": (1, 3600),
    "backoff_factor": (1.0, 10.0),
    "max_delay": (1, 24 * 3600),
}
JITTER = 0.1  # ±10%: retries of one outage do not arrive as one wave


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_delay: float = DEFAULT_INITIAL_DELAY
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR
    max_delay: float = DEFAULT_MAX_DELAY

    def delay_after(self, attempts: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait after `attempts` failed attempts, or None when they are exhausted.

        A receiver's Retry-After wins over the schedule (it knows when it will be back), held
        to the policy's cap so that a hostile value cannot park a delivery for a year.
        """
        if attempts >= self.max_attempts:
            return None
        if retry_after is not None:
            return min(max(retry_after, 1.0), self.max_delay)
        base = self.initial_delay * self.backoff_factor ** max(attempts - 1, 0)
        base = min(base, self.max_delay)
        return base * random.uniform(1 - JITTER, 1 + JITTER)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None when unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max((when - now) / timedelta(seconds=1), 0.0)
