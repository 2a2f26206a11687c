"""The Overview tab's device counts follow the live socket, in a real Chromium and daphne."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from apps.devices import live
from apps.devices.models import Connection, Device
from tests.browser.conftest import (  # noqa: F401 - fixtures used by name
    browser_page,
    chromium,
    login,
    off_loop,
    platform_env,
    server,  # noqa: F811 - the fixture imported above
)
from tests.devices.live_helpers import ALL_DATABASES

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True, databases=ALL_DATABASES),
]


@pytest.fixture
def publisher(platform_env) -> Iterator[live.BatchPublisher]:  # noqa: F811
    # After platform_env: the publisher must use the server's channel layer (Redis prefix).
    publisher = live.BatchPublisher()
    publisher.start()
    yield publisher
    publisher.stop()


def set_state(device: Device, **fields: Any) -> Device:
    Device.objects.filter(pk=device.pk).update(**fields)
    return Device.objects.get(pk=device.pk)


def test_device_counts_update_without_reload(
    alice,
    alice_lamp,
    alice_relay,
    charlie_lamp,
    publisher,
    server,  # noqa: F811 - the fixture imported above
    browser_page,  # noqa: F811
):
    from playwright.sync_api import expect

    page = browser_page
    login(page, server.url, "alice", "alice-pass-123")
    page.goto(f"{server.url}/admin/owners/owner/{alice_lamp.owner_id}/change/")
    # Connected, snapshot applied: from here on only deltas can change the numbers.
    expect(page.locator('[data-owner-id][data-live="live"]')).to_have_count(1, timeout=10_000)
    page.evaluate("window.__notReloaded = true")
    online = page.locator('[data-owner-stat="online"]')
    offline = page.locator('[data-owner-stat="offline"]')
    expect(online).to_have_text("0")

    publisher.publish([off_loop(set_state, alice_lamp, connection=Connection.ONLINE)], [])
    publisher.publish([off_loop(set_state, alice_relay, connection=Connection.OFFLINE)], [])
    expect(online).to_have_text("1", timeout=5_000)
    expect(offline).to_have_text("1", timeout=5_000)
    expect(offline).to_have_class(re.compile("text-red-700"))
    expect(page.locator('[data-owner-stat="unknown"]')).to_have_text("0")

    # Charlie's device going online is not alice's business.
    publisher.publish([off_loop(set_state, charlie_lamp, connection=Connection.ONLINE)], [])
    publisher.publish([off_loop(set_state, alice_relay, connection=Connection.ONLINE)], [])
    expect(online).to_have_text("2", timeout=5_000)
    expect(offline).to_have_text("0")
    assert page.evaluate("window.__notReloaded") is True
