"""Retry schedule: close to Standard Webhooks by default, Retry-After honoured but capped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from apps.forwarding.retry import JITTER, RetryPolicy, parse_retry_after


def test_the_default_schedule_is_close_to_standard_webhooks() -> None:
    policy = RetryPolicy()
    nominal = [5, 30, 180, 1080, 6480, 36000, 36000]
    for attempts, expected in enumerate(nominal, start=1):
        delay = policy.delay_after(attempts)
        assert delay is not None
        assert expected * (1 - JITTER) <= delay <= expected * (1 + JITTER)
    assert policy.delay_after(8) is None  # 8 attempts, then a dead letter
    total = sum(nominal) / 3600
    assert 20 < total < 30  # Standard Webhooks tries for about 27 hours


def test_retry_after_wins_but_is_capped() -> None:
    policy = RetryPolicy(max_delay=600)
    assert policy.delay_after(1, retry_after=42) == 42
    assert policy.delay_after(1, retry_after=0) == 1
    assert policy.delay_after(1, retry_after=10**9) == 600
    assert policy.delay_after(policy.max_attempts, retry_after=5) is None


def test_it_parses_both_retry_after_forms() -> None:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120
    when = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(when, now) == 90
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
