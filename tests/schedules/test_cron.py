"""The cron matcher and the DST rules: a nonexistent local time runs once at the end of the gap,
a repeated local time runs once (at its first occurrence). Expected instants are written out
by hand from the zones' published rules, not computed by the code under test."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from apps.schedules.cron import CronError, get_zone, next_run, occurrences, parse, preview


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def runs(expr: str, zone: str, start: datetime, end: datetime) -> list[datetime]:
    """Run instants in [start, end)."""
    out = []
    for occ in occurrences(parse(expr), get_zone(zone), start - timedelta(microseconds=1)):
        if occ.at >= end:
            break
        out.append(occ.at)
    return out


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("0 30 18 * * *", "exactly 5 fields"),
        ("* * * *", "exactly 5 fields"),
        ("60 * * * *", "minute: 60 is out of range (0-59)"),
        ("* 24 * * *", "hour: 24 is out of range (0-23)"),
        ("* * 0 * *", "day of month: 0 is out of range (1-31)"),
        ("* * * 13 *", "month: 13 is out of range (1-12)"),
        ("* * * * 8", "day of week: 8 is out of range (0-7)"),
        ("*/0 * * * *", "step '0'"),
        ("*/61 * * * *", "larger than the field"),
        ("10-5 * * * *", "goes backwards"),
        ("1,,2 * * * *", "empty list item"),
        ("* * * foo *", "month: 'foo' is not a number"),
        ("@daily", "exactly 5 fields"),
        ("", "Enter a cron expression"),
    ],
)
def test_invalid_expressions_say_which_field_is_wrong(expr, message):
    with pytest.raises(CronError) as err:
        parse(expr)
    assert message in str(err.value)


def test_six_fields_mention_that_seconds_are_not_supported():
    with pytest.raises(CronError, match="Seconds and years are not supported"):
        parse("0 0 18 * * *")


def test_fields_lists_ranges_steps_and_names():
    c = parse("5/20 8-10,22 * jan,JUL mon-fri")
    assert c.minutes == (5, 25, 45)
    assert c.hours == (8, 9, 10, 22)
    assert c.months == {1, 7}
    assert c.weekdays == {1, 2, 3, 4, 5}
    assert parse("0 0 * * 7").weekdays == {0}  # 7 is Sunday too


def test_day_of_month_and_day_of_week_restricted_together_match_either():
    c = parse("0 12 13 * fri")  # the 13th, and every Friday
    zone = get_zone("UTC")
    days = [
        o.at.date() for o, _ in zip(occurrences(c, zone, utc(2026, 2, 1)), range(6), strict=False)
    ]
    assert days == [
        date(2026, 2, 6),
        date(2026, 2, 13),
        date(2026, 2, 20),
        date(2026, 2, 27),
        date(2026, 3, 6),
        date(2026, 3, 13),
    ]


def test_start_and_end_dates_bound_the_local_dates():
    c, zone = parse("0 9 * * *"), get_zone("Europe/Berlin")
    got = [
        o.at
        for o in occurrences(
            c, zone, utc(2026, 1, 1), starts_on=date(2026, 6, 1), ends_on=date(2026, 6, 3)
        )
    ]
    assert got == [utc(2026, 6, 1, 7), utc(2026, 6, 2, 7), utc(2026, 6, 3, 7)]


def test_leap_day_schedule_finds_the_next_29_february_and_impossible_dates_never_run():
    zone = get_zone("UTC")
    assert next_run(parse("0 0 29 2 *"), zone, utc(2026, 3, 1)).at == utc(2028, 2, 29)
    assert next_run(parse("0 0 31 2 *"), zone, utc(2026, 3, 1)) is None


def test_unknown_zones_are_refused():
    for name in ["Mars/Olympus", "europe/berlin", "../etc/passwd", "UTC+7", ""]:
        with pytest.raises(CronError, match="IANA"):
            get_zone(name)


# --- the DST table ------------------------------------------------------------------------------
# Daily schedules at a local time inside the gap / the repeated hour, over the day before, the
# day of, and the day after each transition of 2026 and 2027. Asia/Jakarta (UTC+7, no DST)
# must not move at all on the same dates.

DAILY = [
    # Europe/Berlin: CET +1 / CEST +2; gap 02:00-03:00 on the last Sunday of March, repeated
    # 02:00-03:00 on the last Sunday of October.
    (
        "Europe/Berlin",
        "30 2 * * *",
        utc(2026, 3, 27, 12),
        [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)],
    ),
    (
        "Europe/Berlin",
        "30 2 * * *",
        utc(2026, 10, 23, 12),
        [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)],
    ),
    (
        "Europe/Berlin",
        "30 2 * * *",
        utc(2027, 3, 26, 12),
        [utc(2027, 3, 27, 1, 30), utc(2027, 3, 28, 1, 0), utc(2027, 3, 29, 0, 30)],
    ),
    (
        "Europe/Berlin",
        "30 2 * * *",
        utc(2027, 10, 29, 12),
        [utc(2027, 10, 30, 0, 30), utc(2027, 10, 31, 0, 30), utc(2027, 11, 1, 1, 30)],
    ),
    # America/New_York: EST -5 / EDT -4; gap 02:00-03:00 on the second Sunday of March,
    # repeated 01:00-02:00 on the first Sunday of November.
    (
        "America/New_York",
        "30 2 * * *",
        utc(2026, 3, 7),
        [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)],
    ),
    (
        "America/New_York",
        "30 1 * * *",
        utc(2026, 10, 31),
        [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)],
    ),
    (
        "America/New_York",
        "30 2 * * *",
        utc(2027, 3, 13),
        [utc(2027, 3, 13, 7, 30), utc(2027, 3, 14, 7, 0), utc(2027, 3, 15, 6, 30)],
    ),
    (
        "America/New_York",
        "30 1 * * *",
        utc(2027, 11, 6),
        [utc(2027, 11, 6, 5, 30), utc(2027, 11, 7, 5, 30), utc(2027, 11, 8, 6, 30)],
    ),
    # Australia/Sydney: AEST +10 / AEDT +11; repeated 02:00-03:00 on the first Sunday of April,
    # gap 02:00-03:00 on the first Sunday of October.
    (
        "Australia/Sydney",
        "30 2 * * *",
        utc(2026, 4, 3),
        [utc(2026, 4, 3, 15, 30), utc(2026, 4, 4, 15, 30), utc(2026, 4, 5, 16, 30)],
    ),
    (
        "Australia/Sydney",
        "30 2 * * *",
        utc(2026, 10, 2),
        [utc(2026, 10, 2, 16, 30), utc(2026, 10, 3, 16, 0), utc(2026, 10, 4, 15, 30)],
    ),
    (
        "Australia/Sydney",
        "30 2 * * *",
        utc(2027, 4, 2),
        [utc(2027, 4, 2, 15, 30), utc(2027, 4, 3, 15, 30), utc(2027, 4, 4, 16, 30)],
    ),
    (
        "Australia/Sydney",
        "30 2 * * *",
        utc(2027, 10, 1),
        [utc(2027, 10, 1, 16, 30), utc(2027, 10, 2, 16, 0), utc(2027, 10, 3, 15, 30)],
    ),
]
JAKARTA_DATES = [
    date(2026, 3, 29),
    date(2026, 10, 25),
    date(2027, 3, 28),
    date(2027, 10, 31),
    date(2026, 3, 8),
    date(2026, 11, 1),
    date(2026, 4, 5),
    date(2026, 10, 4),
]


@pytest.mark.parametrize(
    ("zone", "expr", "start", "expected"), DAILY, ids=[f"{z}-{s:%Y-%m}" for z, _, s, _ in DAILY]
)
def test_daily_schedule_across_a_transition(zone, expr, start, expected):
    assert runs(expr, zone, start, expected[-1] + timedelta(seconds=1)) == expected


@pytest.mark.parametrize("day", JAKARTA_DATES)
def test_jakarta_has_no_transition_and_never_moves(day):
    start = datetime(day.year, day.month, day.day, tzinfo=UTC) - timedelta(days=2)
    got = runs("30 2 * * *", "Asia/Jakarta", start, start + timedelta(days=3))
    assert [t.time() for t in got] == [datetime(2000, 1, 1, 19, 30).time()] * 3
    assert len(runs("*/15 * * * *", "Asia/Jakarta", start, start + timedelta(days=1))) == 96


# Every-15-minutes schedules on the transition days: across a gap the run times stay 15 real
# minutes apart (the four wall times inside the gap collapse into the one at its end, which
# is also 03:00 itself); across the repeated hour each wall time runs once, so there is one
# hour without runs.
GAPS = [  # zone, first UTC instant of the gap's end, UTC offset before (hours)
    ("Europe/Berlin", utc(2026, 3, 29, 1), 1),
    ("Europe/Berlin", utc(2027, 3, 28, 1), 1),
    ("America/New_York", utc(2026, 3, 8, 7), -5),
    ("America/New_York", utc(2027, 3, 14, 7), -5),
    ("Australia/Sydney", utc(2026, 10, 3, 16), 10),
    ("Australia/Sydney", utc(2027, 10, 2, 16), 10),
]
FOLDS = [  # zone, UTC instant the repeated hour starts (first pass), its end (second pass)
    ("Europe/Berlin", utc(2026, 10, 25, 0), utc(2026, 10, 25, 2)),
    ("Europe/Berlin", utc(2027, 10, 31, 0), utc(2027, 10, 31, 2)),
    ("America/New_York", utc(2026, 11, 1, 5), utc(2026, 11, 1, 7)),
    ("America/New_York", utc(2027, 11, 7, 5), utc(2027, 11, 7, 7)),
    ("Australia/Sydney", utc(2026, 4, 4, 15), utc(2026, 4, 4, 17)),
    ("Australia/Sydney", utc(2027, 4, 3, 15), utc(2027, 4, 3, 17)),
]


@pytest.mark.parametrize(
    ("zone", "gap_end", "offset"), GAPS, ids=[f"{z}-{g:%Y}" for z, g, _ in GAPS]
)
def test_every_15_minutes_across_the_gap_runs_once_per_quarter_hour(zone, gap_end, offset):
    start, end = gap_end - timedelta(hours=3), gap_end + timedelta(hours=3)
    got = runs("*/15 * * * *", zone, start, end)
    assert len(got) == len(set(got)) == 24  # 6 real hours
    assert all(b - a == timedelta(minutes=15) for a, b in zip(got, got[1:], strict=False))
    assert gap_end in got


@pytest.mark.parametrize(
    ("zone", "first", "second"), FOLDS, ids=[f"{z}-{f:%Y}" for z, f, _ in FOLDS]
)
def test_every_15_minutes_across_the_repeated_hour_runs_each_wall_time_once(zone, first, second):
    start, end = first - timedelta(hours=2), second + timedelta(hours=2)
    got = runs("*/15 * * * *", zone, start, end)
    # 6 real hours, but the second pass of the repeated hour does not run again.
    assert len(got) == len(set(got)) == 20
    assert [t for t in got if first <= t < first + timedelta(hours=1)] == [
        first + timedelta(minutes=m) for m in (0, 15, 30, 45)
    ]
    assert [t for t in got if second - timedelta(hours=1) <= t < second] == []
    local = [t.astimezone(get_zone(zone)).strftime("%H:%M") for t in got]
    assert len(local) == len(set(local))  # every wall time once


def test_hourly_schedule_in_the_gap_hour_runs_once_at_its_end():
    got = runs("0,30 2 * * *", "Europe/Berlin", utc(2026, 3, 28, 23), utc(2026, 3, 29, 23))
    assert got == [utc(2026, 3, 29, 1)]  # 02:00 and 02:30 both become 03:00, once


def test_next_run_from_inside_the_second_pass_of_the_fold_skips_to_the_next_day():
    zone = get_zone("Europe/Berlin")
    inside_second_pass = utc(2026, 10, 25, 1, 10)  # 02:10 CET, the second 02:10 that night
    assert next_run(parse("30 2 * * *"), zone, inside_second_pass).at == utc(2026, 10, 26, 1, 30)


def test_preview_marks_runs_next_to_a_clock_change():
    rows = preview(parse("30 2 * * *"), get_zone("Europe/Berlin"), utc(2026, 3, 26), count=5)
    assert [r.at for r in rows] == [
        utc(2026, 3, 26, 1, 30),
        utc(2026, 3, 27, 1, 30),
        utc(2026, 3, 28, 1, 30),
        utc(2026, 3, 29, 1, 0),
        utc(2026, 3, 30, 0, 30),
    ]
    assert [r.near_dst for r in rows] == [False, False, True, True, True]
    assert "does not exist" in rows[3].note
    assert rows[3].local.isoformat() == "2026-03-29T03:00:00+02:00"
    fold = preview(parse("30 2 * * *"), get_zone("Europe/Berlin"), utc(2026, 10, 24, 12), count=1)
    assert "happens twice" in fold[0].note
