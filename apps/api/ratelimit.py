"""Rate limits counted in the database: per API key, per owner, and failed browser logins.

Why the database and not the cache: the embedded cache is a file cache whose `incr` is a
read-modify-write without a lock, and a locmem cache is per process — neither holds a limit
across the web processes. One upsert per bucket is atomic on PostgreSQL and SQLite alike:

    INSERT INTO api_ratecounter (bucket, window_start, expires, count) VALUES (…, 1)
    ON CONFLICT (bucket, window_start) DO UPDATE SET count = api_ratecounter.count + 1
    RETURNING count

Each concurrent request gets a distinct count, so exactly `limit` requests of a window pass.
Windows are fixed (aligned on multiples of their length): simple, one row per bucket and window,
and `Retry-After` is exact; a client may burst up to twice the limit across a window boundary.
Expired rows are deleted by the periodic cleanup task (`apps.api.tasks`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F

from .models import RateCounter


@dataclass(frozen=True, slots=True)
class Window:
    count: int  # this request included
    limit: int
    reset_at: float  # Unix time the window ends

    @property
    def allowed(self) -> bool:
        return self.count <= self.limit

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)

    def retry_after(self, now: float | None = None) -> int:
        return max(1, math.ceil(self.reset_at - (time.time() if now is None else now)))


def _bounds(seconds: int, now: float) -> tuple[int, int]:
    start = int(now // seconds) * seconds
    return start, start + seconds


def hit(bucket: str, limit: int, seconds: int, now: float | None = None) -> Window:
    """Count one event in the current window of `bucket`."""
    now = time.time() if now is None else now
    start, end = _bounds(seconds, now)
    if connection.vendor in ("postgresql", "sqlite"):
        qn = connection.ops.quote_name
        table = qn(RateCounter._meta.db_table)
        # Only quoted identifiers are interpolated; every value is bound.
        sql = (
            f"INSERT INTO {table} ({qn('bucket')}, {qn('window_start')}, {qn('expires')}, "  # noqa: S608
            f"{qn('count')}) VALUES (%s, %s, %s, 1) "
            f"ON CONFLICT ({qn('bucket')}, {qn('window_start')}) "
            f"DO UPDATE SET {qn('count')} = {table}.{qn('count')} + 1 "
            f"RETURNING {qn('count')}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [bucket, start, end])
            count = cursor.fetchone()[0]
    else:  # pragma: no cover - the platform runs on PostgreSQL or SQLite
        with transaction.atomic():
            row, _ = RateCounter.objects.select_for_update().get_or_create(
                bucket=bucket, window_start=start, defaults={"expires": end}
            )
            RateCounter.objects.filter(pk=row.pk).update(count=F("count") + 1)
            row.refresh_from_db(fields=["count"])
            count = row.count
    return Window(count=count, limit=limit, reset_at=end)


def lock(bucket: str, seconds: int, now: float | None = None) -> float:
    """Lock `bucket` for `seconds` from now (a lock already running is extended, never
    shortened); returns the Unix time it ends.

    A lock is a row of its own (`lock:<bucket>`, window 0) whose `expires` is when it ends, so it
    lasts its full length whenever it was taken — unlike a fixed window's count, which starts
    afresh at the next window boundary. The cleanup task deletes it once it has ended."""
    now = time.time() if now is None else now
    until = math.ceil(now + seconds)
    name = f"lock:{bucket}"
    with transaction.atomic():
        updated = RateCounter.objects.filter(bucket=name, window_start=0, expires__lt=until).update(
            expires=until
        )
        if not updated:
            RateCounter.objects.bulk_create(
                [RateCounter(bucket=name, window_start=0, expires=until)], ignore_conflicts=True
            )
        return RateCounter.objects.get(bucket=name, window_start=0).expires


def locked_until(bucket: str, now: float | None = None) -> float | None:
    """When the lock on `bucket` ends, or None when it is not locked."""
    now = time.time() if now is None else now
    return (
        RateCounter.objects.filter(bucket=f"lock:{bucket}", window_start=0, expires__gt=now)
        .values_list("expires", flat=True)
        .first()
    )


def delete_expired(now: float | None = None) -> int:
    now = time.time() if now is None else now
    return RateCounter.objects.filter(expires__lt=int(now)).delete()[0]


# --- the API's limits -------------------------------------------------------------------------


def api_window() -> int:
    return int(settings.API_RATE_WINDOW_SECONDS)


def check_api(key_id: int, owner_id: int) -> Window:
    """Count a request against its key's and its owner's limits; the tighter answer wins.

    The owner bucket is only counted when the key's own limit let the request through, so one
    runaway key exhausting itself does not also eat its owner's budget."""
    seconds = api_window()
    per_key = hit(f"key:{key_id}", int(settings.API_RATE_PER_KEY), seconds)
    if not per_key.allowed:
        return per_key
    per_owner = hit(f"owner:{owner_id}", int(settings.API_RATE_PER_OWNER), seconds)
    if not per_owner.allowed:
        return per_owner
    return per_key if per_key.remaining <= per_owner.remaining else per_owner
