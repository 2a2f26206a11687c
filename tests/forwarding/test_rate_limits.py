"""Per-destination and per-owner rate limits hold across drain loops (shared windows)."""

from __future__ import annotations

from apps.forwarding import pipeline, ratelimit
from apps.forwarding.models import Delivery, Status
from apps.forwarding.outbox import write_outbox

from .conftest import make_event, make_webhook


def test_a_window_grants_what_is_left_of_the_limit() -> None:
    assert ratelimit.take("t", 7, 10, now=100.0) == 7
    assert ratelimit.take("t", 7, 10, now=100.5) == 3
    assert ratelimit.take("t", 7, 10, now=100.9) == 0
    assert ratelimit.take("t", 7, 10, now=101.0) == 7  # a new second


def test_a_destination_rate_limit_caps_sends_per_second(receiver, alice_owner, alice_lamp) -> None:
    make_webhook(alice_owner, receiver.url(), rate_limit=5)
    write_outbox([make_event(alice_lamp) for _ in range(40)])
    stats = pipeline.drain(budget=1.5, linger=0.0)
    # At most two one-second windows were open during 1.5 s: 5 + 5.
    assert 5 <= stats.claimed <= 10
    assert len(receiver.requests) == stats.claimed
    assert Delivery.objects.filter(status=Status.PENDING).count() == 40 - stats.claimed


def test_the_owner_rate_limit_spans_her_destinations(
    receiver, alice_owner, alice_lamp, settings
) -> None:
    settings.DELIVERY_OWNER_RATE = 6
    make_webhook(alice_owner, receiver.url("/a"))
    make_webhook(alice_owner, receiver.url("/b"))
    write_outbox([make_event(alice_lamp) for _ in range(20)])
    stats = pipeline.drain(budget=1.5, linger=0.0)
    assert 6 <= stats.claimed <= 12
