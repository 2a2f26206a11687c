"""Five-field cron expressions, evaluated on local wall-clock time in an IANA time zone.

Why our own: django-celery-beat's crontab has open DST bugs and no missed-run policy
(FACTS.md), and croniter's DST handling is not the rule we promise. The rules (SPEC §6):

- a local time that does not exist (the spring-forward gap) runs once, at the first valid
  instant after it — the end of the gap; several matching times inside one gap (say every
  15 minutes) collapse into that single run;
- a local time that happens twice (the fall-back fold) runs once, at its first occurrence;
- day-of-month and day-of-week follow Vixie cron: when both are restricted (neither starts
  with `*`), a day matching either runs.

Every instant is computed with `zoneinfo` from wall-clock candidates, so the zone's own rules
(including historical and future changes shipped in tzdata) decide.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# (name, lowest, highest, names for the values starting at `lowest`)
FIELDS: list[tuple[str, int, int, list[str]]] = [
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day of month", 1, 31, []),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, WEEKDAYS),
]
# "0 0 29 2 *" runs once in up to 8 years (no 29 February in 2100).
HORIZON_DAYS = 366 * 8 + 2


class CronError(ValueError):
    """An expression that is not a valid 5-field cron; the message is meant for a form."""


@dataclass(frozen=True)
class Cron:
    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day-of-month field starts with "*"
    any_weekday: bool  # day-of-week field starts with "*"

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.weekday() + 1) % 7 in self.weekdays
        if self.any_day and self.any_weekday:
            return True
        if self.any_day:
            return dow
        if self.any_weekday:
            return dom
        return dom or dow


@functools.lru_cache(maxsize=4096)
def parse(expression: str) -> Cron:
    """Parse a 5-field expression or raise `CronError` saying which field is wrong and why."""
    if not isinstance(expression, str) or not expression.strip():
        raise CronError("Enter a cron expression, e.g. '30 18 * * 1-5'.")
    parts = expression.split()
    if len(parts) != 5:
        hint = " Seconds and years are not supported." if len(parts) in (6, 7) else ""
        raise CronError(
            f"Use exactly 5 fields (minute hour day-of-month month day-of-week); "
            f"this has {len(parts)}.{hint}"
        )
    values = [_field(text, *spec) for text, spec in zip(parts, FIELDS, strict=True)]
    weekdays = frozenset(0 if d == 7 else d for d in values[4])
    return Cron(
        expression=" ".join(parts),
        minutes=tuple(sorted(values[0])),
        hours=tuple(sorted(values[1])),
        days=frozenset(values[2]),
        months=frozenset(values[3]),
        weekdays=weekdays,
        any_day=parts[2].startswith("*"),
        any_weekday=parts[4].startswith("*"),
    )


def _field(text: str, name: str, low: int, high: int, names: list[str]) -> set[int]:
    result: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(f"{name}: empty list item in {text!r}.")
        base, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{name}: step {step_text!r} must be a whole number above 0.")
            step = int(step_text)
            if step > high - low + 1:
                raise CronError(f"{name}: step {step} is larger than the field ({low}-{high}).")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _value(a, name, low, high, names), _value(b, name, low, high, names)
            if first > last:
                raise CronError(f"{name}: range {base!r} goes backwards.")
        else:
            first = _value(base, name, low, high, names)
            # "5/15" means from 5 to the end of the field in steps of 15 (Vixie cron).
            last = high if step_text else first
        result.update(range(first, last + 1, step))
    return result


def _value(text: str, name: str, low: int, high: int, names: list[str]) -> int:
    if text.lower() in names:
        return names.index(text.lower()) + (low if name == "month" else 0)
    if not text.isdigit():
        allowed = f" or a name ({names[0]}…{names[-1]})" if names else ""
        raise CronError(f"{name}: {text!r} is not a number{allowed}.")
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"{name}: {value} is out of range ({low}-{high}).")
    return value


# --- time zones -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def zone_names() -> list[str]:
    return sorted(_zone_names())


def get_zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone `name`, or `CronError` (not a file path, not a POSIX TZ string)."""
    if name not in _zone_names():
        raise CronError(f"{name!r} is not an IANA time zone (e.g. Europe/Berlin).")
    return zoneinfo.ZoneInfo(name)


# --- occurrences --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Occurrence:
    at: datetime  # the instant it runs, UTC
    wall: datetime  # the naive local time the expression matched
    shifted: bool = False  # `wall` did not exist (DST gap): runs when the gap ends
    ambiguous: bool = False  # `wall` happened twice (DST fold): runs at the first

    def local(self, zone: tzinfo) -> datetime:
        return self.at.astimezone(zone)


def resolve(wall: datetime, zone: tzinfo) -> Occurrence:
    """The instant a local wall-clock time runs at, under the DST rules above."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
        return Occurrence(at=first, wall=wall, ambiguous=second != first)
    # In a gap, fold=0 and fold=1 give instants on either side of the transition; the gap
    # ends at the first instant whose local time is at or after `wall`.
    lo, hi = sorted((first, wall.replace(tzinfo=zone, fold=1).astimezone(UTC)))
    while hi - lo > timedelta(seconds=1):
        mid = lo + timedelta(seconds=int((hi - lo).total_seconds()) // 2)
        if mid.astimezone(zone).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid
    return Occurrence(at=hi, wall=wall, shifted=True)


def occurrences(
    cron: Cron,
    zone: tzinfo,
    after: datetime,
    *,
    starts_on: date | None = None,
    ends_on: date | None = None,
) -> Iterator[Occurrence]:
    """Runs strictly after the instant `after`, in order, each instant once.

    `starts_on` / `ends_on` bound the local dates (inclusive). Stops after HORIZON_DAYS
    without a match.
    """
    after = after.astimezone(UTC)
    # Wall-clock times before the wall time of `after` run at or before `after` (a run instant
    # is the first instant whose local time reaches its wall time), so start from there.
    floor = after.astimezone(zone).replace(tzinfo=None, second=0, microsecond=0)
    day = floor.date()
    if starts_on and day < starts_on:
        day, floor = starts_on, datetime.combine(starts_on, time())
    last_day = day + timedelta(days=HORIZON_DAYS)
    if ends_on:
        last_day = min(last_day, ends_on)
    previous = after
    while day <= last_day:
        if day.month not in cron.months:
            day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
            continue
        if cron.matches_day(day):
            for hour in cron.hours:
                for minute in cron.minutes:
                    wall = datetime.combine(day, time(hour, minute))
                    if wall < floor:
                        continue
                    occurrence = resolve(wall, zone)
                    if occurrence.at > previous:
                        previous = occurrence.at
                        yield occurrence
        day += timedelta(days=1)


def next_run(
    cron: Cron,
    zone: tzinfo,
    after: datetime,
    *,
    starts_on: date | None = None,
    ends_on: date | None = None,
) -> Occurrence | None:
    return next(occurrences(cron, zone, after, starts_on=starts_on, ends_on=ends_on), None)


# --- preview ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewRow:
    at: datetime  # UTC
    local: datetime  # aware, in the schedule's zone
    note: str  # why it is marked ("" when it is not next to a DST change)

    @property
    def near_dst(self) -> bool:
        return bool(self.note)


def preview(
    cron: Cron,
    zone: tzinfo,
    after: datetime,
    *,
    count: int = 10,
    starts_on: date | None = None,
    ends_on: date | None = None,
) -> list[PreviewRow]:
    """The next `count` runs, each marked when it sits next to a DST change of the zone."""
    rows = []
    for occ in occurrences(cron, zone, after, starts_on=starts_on, ends_on=ends_on):
        rows.append(PreviewRow(at=occ.at, local=occ.local(zone), note=_dst_note(occ, zone)))
        if len(rows) >= count:
            break
    return rows


def _dst_note(occ: Occurrence, zone: tzinfo) -> str:
    if occ.shifted:
        return f"{occ.wall:%H:%M} does not exist that day (clocks go forward): runs at gap end"
    if occ.ambiguous:
        return f"{occ.wall:%H:%M} happens twice that day (clocks go back): runs at the first"
    before = (occ.at - timedelta(days=1)).astimezone(zone).utcoffset()
    after = (occ.at + timedelta(days=1)).astimezone(zone).utcoffset()
    if before != after:
        return f"within a day of a clock change (UTC{_offset(before)} → UTC{_offset(after)})"
    return ""


def _offset(delta: timedelta | None) -> str:
    minutes = int((delta or timedelta()).total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
