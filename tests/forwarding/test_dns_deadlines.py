"""Name resolution has deadlines: a DNS server that never answers costs a webhook batch at most
its destination's timeout (DNS counts against the rows' total deadline), Test Connection and
saving likewise, never another destination's deliveries; lookups of one name are shared, and a
flood of hanging names ties up only the guard's own few DNS threads.

The silent DNS server is the seam (`tests/forwarding/dns.py`); the receiver, the pipeline and
libcurl are real. Times are asserted only as "well under the 30 s hang"."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from django.core.exceptions import ValidationError

from apps.forwarding import actions, egress
from apps.forwarding.models import Attempt, Delivery, Outcome, Status
from apps.forwarding.outbox import forget_routes, write_outbox
from apps.forwarding.webhook.models import WebhookDestination

from .conftest import deliver_due, make_due_now, make_event, make_webhook
from .dns import HANG
from .receiver import Answer

WELL_UNDER_THE_HANG = HANG / 3


def hook_for(owner, url: str, **fields) -> WebhookDestination:
    """A destination saved without the save-time lookup (which a hanging name would fail)."""
    fields.setdefault("name", url)
    destination = WebhookDestination.objects.create(owner=owner, url=url, **fields)
    forget_routes()
    return destination


def test_a_hanging_lookup_retries_its_rows_by_the_deadline_while_others_are_delivered(
    receiver, dns, alice_owner, alice_lamp
) -> None:
    name = dns.hang()
    hanging = hook_for(alice_owner, f"http://{name}:{receiver.port}/hook", timeout=2)
    literal = make_webhook(alice_owner, receiver.url("/literal"))
    write_outbox([make_event(alice_lamp) for _ in range(3)])
    t0 = time.monotonic()
    deliver_due()
    assert time.monotonic() - t0 < WELL_UNDER_THE_HANG
    assert Delivery.objects.filter(destination=literal, status=Status.DELIVERED).count() == 3
    assert set(Delivery.objects.filter(destination=hanging).values_list("status", flat=True)) == {
        Status.PENDING
    }
    attempts = list(Attempt.objects.filter(delivery__destination=hanging))
    assert len(attempts) == 3
    for attempt in attempts:
        assert attempt.outcome == Outcome.RETRY and attempt.error == egress.GENERIC_ERROR
        assert attempt.status_code is None
    assert receiver.at("/hook") == []
    assert dns.calls[name] == 1  # one lookup for the batch
    # Delivered meanwhile: the literal destination's requests arrived before the hanging rows'
    # deadline ran out (a lookup on the loop, however bounded, would have held them back).
    gave_up = min(a.started_at.timestamp() + a.duration_ms / 1000 for a in attempts)
    assert max(r.at for r in receiver.at("/literal")) < gave_up


def test_batches_for_the_same_hanging_name_share_one_lookup(
    receiver, dns, alice_owner, alice_lamp
) -> None:
    name = dns.hang()
    hooks = [
        hook_for(alice_owner, f"http://{name}:{receiver.port}/hook/{i}", timeout=1)
        for i in range(2)
    ]
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    assert Attempt.objects.filter(outcome=Outcome.RETRY, error=egress.GENERIC_ERROR).count() == 2
    assert dns.calls[name] == 1
    # The lookup is still running: the next batches and a Test Connection join it.
    make_due_now()
    t0 = time.monotonic()
    deliver_due()
    result = actions.test_destination(hooks[0])
    assert time.monotonic() - t0 < WELL_UNDER_THE_HANG
    assert Attempt.objects.filter(outcome=Outcome.RETRY, error=egress.GENERIC_ERROR).count() == 4
    assert not result.ok and result.message == egress.GENERIC_ERROR
    assert dns.calls[name] == 1
    assert receiver.requests == []


def test_the_time_spent_resolving_counts_against_the_rows_deadline(
    receiver, dns, alice_owner, alice_lamp
) -> None:
    receiver.script("/late", Answer(delay=2.0))
    # 1.5 s of DNS + a 2 s answer > 3 s: cut off (it fit when the deadline started after DNS).
    late = hook_for(alice_owner, f"http://{dns.slow(1.5)}:{receiver.port}/late", timeout=3)
    # 0.5 s of DNS + an immediate answer: delivered.
    on_time = hook_for(alice_owner, f"http://{dns.slow(0.5)}:{receiver.port}/on-time", timeout=3)
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    assert Delivery.objects.get(destination=on_time).status == Status.DELIVERED
    attempt = Attempt.objects.get(delivery__destination=late)
    assert attempt.outcome == Outcome.RETRY and attempt.error == "No complete answer within 3 s"
    assert len(receiver.at("/late")) == 1  # resolved and sent, then cut off at the deadline


def test_test_connection_with_a_hanging_lookup_fails_within_the_timeout(dns, alice_owner) -> None:
    hook = hook_for(alice_owner, f"https://{dns.hang()}/hook", timeout=2)
    t0 = time.monotonic()
    result = actions.test_destination(hook)
    assert time.monotonic() - t0 < WELL_UNDER_THE_HANG
    assert not result.ok and result.message == egress.GENERIC_ERROR
    hook.refresh_from_db()
    assert hook.last_test_ok is False and hook.last_test_message == egress.GENERIC_ERROR


def test_saving_a_url_whose_lookup_hangs_is_refused_within_seconds(
    dns, alice_owner, monkeypatch
) -> None:
    monkeypatch.setattr(egress, "SAVE_LOOKUP_TIMEOUT", 1.0)
    t0 = time.monotonic()
    with pytest.raises(ValidationError) as raised:
        make_webhook(alice_owner, f"https://{dns.hang()}/hook")
    assert time.monotonic() - t0 < WELL_UNDER_THE_HANG
    assert raised.value.messages == [egress.SAVE_ERROR]


def test_a_flood_of_hanging_names_ties_up_only_the_guards_dns_threads(dns, settings) -> None:
    settings.EGRESS_ALLOW = ["127.0.0.1/32"]
    names = [dns.hang() for _ in range(egress.DNS_THREADS + 4)]
    refused: list[str] = []

    def connect(name: str) -> None:
        try:
            egress.resolve_checked(name, 5432, timeout=1)
        except egress.EgressDenied as exc:
            refused.append(exc.reason)

    callers = [threading.Thread(target=connect, args=(name,)) for name in names]
    t0 = time.monotonic()
    for caller in callers:
        caller.start()
    # Meanwhile the event loop's default executor (other work waits there) is free.
    loop = asyncio.new_event_loop()
    try:
        job = loop.run_in_executor(None, lambda: "done")
        assert loop.run_until_complete(asyncio.wait_for(job, 5)) == "done"
    finally:
        loop.close()
    for caller in callers:
        caller.join(WELL_UNDER_THE_HANG)
    assert time.monotonic() - t0 < WELL_UNDER_THE_HANG
    assert len(refused) == len(names)
    assert all(reason.startswith("no answer from DNS within 1 s") for reason in refused)
    # The lookups still queued when their callers gave up are dropped, not run later.
    dns.release()
    deadline = time.monotonic() + 10
    while egress._resolver().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(dns.calls[name] for name in names) <= egress.DNS_THREADS
    # And the threads serve the next name as before.
    assert egress.resolve_checked("127.0.0.1", 5432, timeout=5) == ["127.0.0.1"]
