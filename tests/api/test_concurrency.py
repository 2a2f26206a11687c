"""Limits under real concurrency: threads against two daphne processes on one database.

PostgreSQL in CI, SQLite elsewhere: the counter is one atomic upsert on both, and the
idempotency claim one unique INSERT, so neither depends on the processes sharing memory.
"""

from __future__ import annotations

import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from apps.api.actions import create_api_key
from apps.api.models import ALL_SCOPES
from apps.devices.models import Device

from .servers import web_servers

pytestmark = pytest.mark.django_db(transaction=True)

# One window for the whole test: a boundary crossed mid-test would allow a second batch.
HUGE_WINDOW = str(10**9)


def hammer(servers, calls: list[tuple[str, str, str, dict | None, dict | None]]) -> list:
    """Send every call at once (50 threads), spread over the servers."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [
            pool.submit(servers[n % len(servers)].call, *call) for n, call in enumerate(calls)
        ]
        return [f.result() for f in futures]


def test_fifty_concurrent_requests_against_a_key_limit_of_ten_let_ten_through(
    alice_owner, tmp_path
):
    _key, token = create_api_key(alice_owner, "burst", ALL_SCOPES)
    env = {
        "API_RATE_PER_KEY": "10",
        "API_RATE_PER_OWNER": "1000",
        "API_RATE_WINDOW_SECONDS": HUGE_WINDOW,
    }
    with web_servers(2, tmp_path, **env) as servers:
        answers = hammer(servers, [("GET", "/api/v1/capabilities/", token, None, None)] * 50)
    statuses = Counter(a.status for a in answers)
    assert statuses == {200: 10, 429: 40}, statuses
    limited = [a for a in answers if a.status == 429]
    assert all(int(a.headers["Retry-After"]) >= 1 for a in limited)
    assert {a.json()["error"]["code"] for a in limited} == {"rate_limited"}


def test_the_owner_limit_holds_across_its_keys(alice_owner, charlie_owner, tmp_path):
    tokens = [create_api_key(alice_owner, f"key {n}", ALL_SCOPES)[1] for n in range(5)]
    charlie_token = create_api_key(charlie_owner, "charlie", ALL_SCOPES)[1]
    env = {
        "API_RATE_PER_KEY": "1000",
        "API_RATE_PER_OWNER": "10",
        "API_RATE_WINDOW_SECONDS": HUGE_WINDOW,
    }
    with web_servers(2, tmp_path, **env) as servers:
        answers = hammer(
            servers, [("GET", "/api/v1/devices/", tokens[n % 5], None, None) for n in range(50)]
        )
        # Another owner has its own budget.
        charlie = servers[0].call("GET", "/api/v1/devices/", charlie_token)
    assert Counter(a.status for a in answers) == {200: 10, 429: 40}
    assert charlie.status == 200


def test_concurrent_requests_with_one_idempotency_key_create_one_device(alice_owner, tmp_path):
    _key, token = create_api_key(alice_owner, "retrying client", ALL_SCOPES)
    device_id = f"race-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "profile": "esp32-lamp"}
    headers = {"Idempotency-Key": f"create-{device_id}"}
    with web_servers(2, tmp_path) as servers:
        answers = hammer(servers, [("POST", "/api/v1/devices/", token, body, headers)] * 20)
    assert Device.objects.filter(device_id=device_id).count() == 1
    originals = [a for a in answers if a.status == 201 and "Idempotent-Replayed" not in a.headers]
    replays = [a for a in answers if a.headers.get("Idempotent-Replayed") == "true"]
    in_flight = [a for a in answers if a.status == 409]
    assert len(originals) == 1
    assert len(originals) + len(replays) + len(in_flight) == 20
    assert all(a.body == originals[0].body for a in replays)
    assert {a.json()["error"]["code"] for a in in_flight} <= {"idempotency_key_in_flight"}
