"""Fixtures for Data Delivery: a loopback receiver the egress guard lets through, webhook
destinations, events, and a drain that runs the real pipeline in the test process."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime

import pytest
from django.utils import timezone

from apps.devices.events import TELEMETRY, DeviceEvent
from apps.devices.models import Device
from apps.forwarding import egress, kinds, outbox, pipeline
from apps.forwarding.models import Delivery, Status
from apps.forwarding.webhook.models import WebhookDestination
from apps.owners.models import Owner

from .dns import SilentDNS
from .receiver import Receiver

_event_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def _fresh_caches(settings, tmp_path) -> Iterator[None]:
    # A private cache per test: rate-limit windows and kick coalescing must not leak between
    # tests (the embedded file cache is shared by every process using this VAR_DIR).
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": str(tmp_path),
        }
    }
    outbox.forget_routes()
    yield
    outbox.forget_routes()


@pytest.fixture(autouse=True, scope="session")
def _close_transports() -> Iterator[None]:
    yield
    kinds.close_transports()


@pytest.fixture
def receiver(settings) -> Iterator[Receiver]:
    server = Receiver("127.0.0.1")
    settings.EGRESS_ALLOW = ["127.0.0.1/32"]
    settings.WEBHOOK_ALLOW_HTTP = True
    yield server
    server.close()


def make_webhook(owner: Owner, url: str, **fields) -> WebhookDestination:
    fields.setdefault("name", f"hook-{next(_event_ids)}")
    destination = WebhookDestination(owner=owner, url=url, **fields)
    destination.full_clean()
    destination.save()
    outbox.forget_routes()
    return destination


def make_event(
    device: Device, type: str = TELEMETRY, data: dict | None = None, ts: datetime | None = None
) -> DeviceEvent:
    now = timezone.now()
    n = next(_event_ids)
    return DeviceEvent(
        event_id=f"tel_{n}",
        type=type,
        owner_id=device.owner_id,
        device_pk=device.pk,
        device_id=device.device_id,
        device_name=device.name,
        profile=device.profile,
        ts=ts or now,
        received_at=now,
        data={"voltage": 230.5, "n": n} if data is None else data,
        seq=n,
    )


def deliver_due(budget: float = 10.0) -> pipeline.DrainStats:
    """Run the real drain loop in this process until nothing is due (linger 0)."""
    return pipeline.drain(budget, linger=0.0)


def make_due_now() -> None:
    """Time travel for retries: everything waiting becomes due."""
    Delivery.objects.filter(status=Status.PENDING).update(next_attempt_at=timezone.now())


@pytest.fixture
def dns(monkeypatch) -> Iterator[SilentDNS]:
    """A DNS server that does not answer (or answers late) for the names it hands out."""
    silent = SilentDNS()
    monkeypatch.setattr(egress, "_getaddrinfo", silent)
    yield silent
    silent.release()
