"""Every outcome of a webhook attempt against a real receiver, with its timing (SPEC §5):
2xx success; redirects not followed; 410 disables; 429/503 honour Retry-After; timeouts (a total
deadline, slow-drip bodies included), connection errors and 5xx retry; other 4xx fail."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from email.utils import format_datetime

import orjson
import pytest
from django.utils import timezone

from apps.forwarding import egress
from apps.forwarding.models import (
    AlertKind,
    Attempt,
    Delivery,
    DeliveryAlert,
    Destination,
    Outcome,
    Status,
)
from apps.forwarding.outbox import write_outbox

from .conftest import deliver_due, make_due_now, make_event, make_webhook
from .receiver import Answer, signed_by


def send_one(hook, device, **event) -> tuple[Delivery, Attempt]:
    write_outbox([make_event(device, **event)])
    started = timezone.now()
    deliver_due()
    delivery = Delivery.objects.get(destination=hook)
    attempt = Attempt.objects.filter(delivery=delivery).latest("id")
    assert attempt.started_at >= started - timedelta(seconds=1)
    return delivery, attempt


def seconds_until(when) -> float:
    return (when - timezone.now()).total_seconds()


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_a_2xx_answer_delivers(status, receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(status, body=b"" if status == 204 else b"thanks"))
    hook = make_webhook(alice_owner, receiver.url(), initial_delay=5)
    delivery, attempt = send_one(hook, alice_lamp)
    assert delivery.status == Status.DELIVERED and delivery.delivered_at is not None
    assert delivery.attempts == 1 and delivery.last_status_code == status
    assert attempt.outcome == Outcome.DELIVERED and attempt.status_code == status
    assert attempt.duration_ms < 5000
    [request] = receiver.requests
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == delivery.message_id
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
    assert signed_by(request, hook.secret.reveal())
    body = orjson.loads(request.body)
    assert body["type"] == "telemetry" and body["data"]["device"]["id"] == "alice-lamp-1"
    hook.refresh_from_db()
    assert hook.delivered_count == 1 and hook.last_success_at is not None


def test_put_and_custom_headers_are_sent(receiver, alice_owner, alice_lamp) -> None:
    from apps.forwarding.webhook.models import WebhookHeader

    hook = make_webhook(alice_owner, receiver.url(), method="PUT")
    WebhookHeader.objects.create(destination=hook, name="X-Team", value="lamps")
    WebhookHeader.objects.create(destination=hook, name="Authorization", secret_value="Bearer s3")
    send_one(hook, alice_lamp)
    [request] = receiver.requests
    assert request.method == "PUT"
    assert request.headers["x-team"] == "lamps"
    assert request.headers["authorization"] == "Bearer s3"


def test_it_retries_on_503_with_retry_after(receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(503, {"Retry-After": "120"}), Answer(200))
    hook = make_webhook(alice_owner, receiver.url(), initial_delay=5)
    delivery, attempt = send_one(hook, alice_lamp)
    assert delivery.status == Status.PENDING and attempt.outcome == Outcome.RETRY
    assert 118 <= seconds_until(delivery.next_attempt_at) <= 122  # the receiver's 120 s
    assert deliver_due().claimed == 0  # not due yet: nothing is sent early
    make_due_now()
    deliver_due()
    delivery.refresh_from_db()
    assert delivery.status == Status.DELIVERED and delivery.attempts == 2
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery.message_id


def test_it_retries_on_429_with_an_http_date(receiver, alice_owner, alice_lamp) -> None:
    when = format_datetime(timezone.now() + timedelta(seconds=300), usegmt=True)
    receiver.script("/hook", Answer(429, {"Retry-After": when}))
    hook = make_webhook(alice_owner, receiver.url(), initial_delay=5)
    delivery, attempt = send_one(hook, alice_lamp)
    assert attempt.outcome == Outcome.RETRY and attempt.status_code == 429
    assert 290 <= seconds_until(delivery.next_attempt_at) <= 302


def test_retry_after_is_held_to_the_policy_cap(receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(503, {"Retry-After": "999999"}))
    hook = make_webhook(alice_owner, receiver.url(), max_delay=600)
    delivery, _attempt = send_one(hook, alice_lamp)
    assert 598 <= seconds_until(delivery.next_attempt_at) <= 602


def test_a_5xx_retries_on_the_policy_schedule(receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(500))
    hook = make_webhook(
        alice_owner, receiver.url(), initial_delay=10, backoff_factor=3, max_attempts=3
    )
    delivery, attempt = send_one(hook, alice_lamp)
    assert attempt.outcome == Outcome.RETRY and delivery.last_status_code == 500
    assert 8.5 <= seconds_until(delivery.next_attempt_at) <= 13  # 10 s ± jitter, whole s
    make_due_now()
    deliver_due()
    delivery.refresh_from_db()
    assert 26.5 <= seconds_until(delivery.next_attempt_at) <= 35  # 10 × 3 ± jitter
    make_due_now()
    deliver_due()
    delivery.refresh_from_db()
    # Third attempt of three: a dead letter, kept with its last error.
    assert delivery.status == Status.FAILED and delivery.attempts == 3
    assert "gave up after 3 attempts" in delivery.last_error
    assert [a.outcome for a in Attempt.objects.filter(delivery=delivery).order_by("id")] == [
        Outcome.RETRY,
        Outcome.RETRY,
        Outcome.FAILED,
    ]
    hook.refresh_from_db()
    assert (hook.retried_count, hook.failed_count, hook.attempt_count) == (2, 1, 3)
    assert hook.failing_since is not None and "HTTP 500" in hook.last_error


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 408, 413, 422])
def test_other_4xx_fail_without_retry(status, receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(status, body=b"nope " * 300))
    hook = make_webhook(alice_owner, receiver.url())
    delivery, attempt = send_one(hook, alice_lamp)
    assert delivery.status == Status.FAILED and attempt.outcome == Outcome.FAILED
    assert attempt.status_code == status
    assert attempt.response.startswith("nope") and len(attempt.response) == 512  # truncated
    make_due_now()
    assert deliver_due().claimed == 0
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed(status, receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(status, {"Location": receiver.url("/elsewhere")}))
    hook = make_webhook(alice_owner, receiver.url())
    delivery, attempt = send_one(hook, alice_lamp)
    assert delivery.status == Status.FAILED and attempt.status_code == status
    assert "Redirects are not followed" in attempt.error
    assert receiver.at("/elsewhere") == []


def test_410_disables_the_destination_and_alerts(receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(410))
    hook = make_webhook(alice_owner, receiver.url())
    delivery, attempt = send_one(hook, alice_lamp)
    assert attempt.outcome == Outcome.GONE
    hook.refresh_from_db()
    assert not hook.enabled and "410" in hook.disabled_reason
    # Kept in line (not a dead letter): re-enabling delivers it.
    assert delivery.status == Status.PENDING
    alert = DeliveryAlert.objects.get(destination=hook)
    assert alert.kind == AlertKind.DISABLED and alert.owner_id == alice_owner.pk
    write_outbox([make_event(alice_lamp)])  # a disabled destination gets no new rows
    assert Delivery.objects.filter(destination=hook).count() == 1


def test_a_timeout_is_a_total_deadline(receiver, alice_owner, alice_lamp) -> None:
    receiver.script("/hook", Answer(200, delay=10))
    hook = make_webhook(alice_owner, receiver.url(), timeout=1)
    t0 = time.monotonic()
    delivery, attempt = send_one(hook, alice_lamp)
    assert time.monotonic() - t0 < 8  # cut off, not waited out
    assert attempt.outcome == Outcome.RETRY and delivery.status == Status.PENDING
    assert 1000 <= attempt.duration_ms < 3000
    assert attempt.error == "No complete answer within 1 s"


def test_a_slow_drip_body_hits_the_same_deadline(receiver, alice_owner, alice_lamp) -> None:
    # Headers at once, then one byte every 0.2 s for 40 bytes: 8 s if we waited.
    receiver.script("/hook", Answer(200, body=b"x" * 40, drip=0.2))
    hook = make_webhook(alice_owner, receiver.url(), timeout=1)
    t0 = time.monotonic()
    delivery, attempt = send_one(hook, alice_lamp)
    assert time.monotonic() - t0 < 6
    assert attempt.outcome == Outcome.RETRY and 1000 <= attempt.duration_ms < 3000


def test_a_refused_connection_retries_with_a_generic_error(
    receiver, alice_owner, alice_lamp
) -> None:
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hook = make_webhook(alice_owner, f"http://127.0.0.1:{port}/hook", initial_delay=5)
    delivery, attempt = send_one(hook, alice_lamp)
    assert attempt.outcome == Outcome.RETRY and attempt.status_code is None
    assert attempt.error == egress.GENERIC_ERROR
    assert 4.2 <= seconds_until(delivery.next_attempt_at) <= 7.5


def test_a_bad_template_fails_the_delivery_with_its_reason(
    receiver, alice_owner, alice_lamp, monkeypatch
) -> None:
    from apps.forwarding import template

    monkeypatch.setattr(template, "BODY_MAX_BYTES", 50)
    hook = make_webhook(alice_owner, receiver.url(), payload_template={"v": "${data}"})
    delivery, attempt = send_one(hook, alice_lamp, data={"blob": "x" * 100})
    assert delivery.status == Status.FAILED and "Payload template" in attempt.error
    assert receiver.requests == []


def test_a_template_shapes_the_body_with_types(receiver, alice_owner, alice_meter) -> None:
    hook = make_webhook(
        alice_owner,
        receiver.url(),
        payload_template={
            "device": "${device.id}",
            "volts": "${data.voltage}",
            "label": "${device.name}: ${data.voltage} V",
            "fixed": [1, True, None],
        },
    )
    send_one(hook, alice_meter, data={"voltage": 231.2})
    [request] = receiver.requests
    assert orjson.loads(request.body) == {
        "device": "alice-meter-1",
        "volts": 231.2,
        "label": "Traction DC meter: 231.2 V",
        "fixed": [1, True, None],
    }
    assert signed_by(request, hook.secret.reveal())


def test_filters_pick_event_types_and_devices(
    receiver, alice_owner, alice_lamp, alice_meter
) -> None:
    hook = make_webhook(alice_owner, receiver.url(), event_types=["telemetry"])
    hook.devices.set([alice_meter])
    everything = make_webhook(alice_owner, receiver.url("/all"))
    events = [
        make_event(alice_meter),
        make_event(alice_meter, type="status"),
        make_event(alice_lamp),
    ]
    assert write_outbox(events) == 1 + 3
    deliver_due()
    assert len(receiver.at("/hook")) == 1 and len(receiver.at("/all")) == 3
    assert Destination.objects.get(pk=everything.pk).delivered_count == 3
