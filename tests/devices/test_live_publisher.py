"""BatchPublisher: the listener's hand-off to the channel layer never blocks and coalesces.

A real channel (added to the owner's group on the configured layer) stands in for a browser.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from apps.devices import live
from apps.devices.models import Device

from .live_helpers import ALL_DATABASES, event, isolated_layer_config, shared_cache_config

pytestmark = pytest.mark.django_db(transaction=True, databases=ALL_DATABASES)
TIMEOUT = 5


@pytest.fixture(autouse=True)
def _layer(settings):
    settings.CHANNEL_LAYERS = isolated_layer_config()


class Listener:
    """A channel in some groups on the configured layer: what a socket would receive."""

    def __init__(self, *groups: str) -> None:
        self.groups = groups

    async def __aenter__(self) -> Listener:
        self.layer = get_channel_layer()
        self.channel = await self.layer.new_channel()
        await live.awatch(self.groups)  # as a socket does
        for group in self.groups:
            await self.layer.group_add(group, self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        close = getattr(self.layer, "close", None)
        if close:
            await close()

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self.layer.receive(self.channel), timeout)
        except TimeoutError:
            return None


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async_to_sync(scenario)()


async def idle(publisher: live.BatchPublisher) -> bool:
    return await asyncio.to_thread(publisher.wait_idle, TIMEOUT)


def with_power(device: Device, state: str) -> Device:
    device.power = {"1": state}
    return device


def test_batches_published_while_a_flush_is_pending_are_merged(alice_lamp):
    publisher = live.BatchPublisher(flush_interval=1.0)

    async def scenario() -> None:
        async with Listener(live.owner_group(alice_lamp.owner_id)) as listener:
            publisher.start()
            publisher.publish([with_power(alice_lamp, "ON")], [])
            assert await idle(publisher)
            # The loop now waits out its flush interval: the next two batches become one message.
            publisher.publish([with_power(alice_lamp, "OFF")], [])
            publisher.publish([with_power(alice_lamp, "ON")], [])
            assert await idle(publisher)

            first, second = await listener.receive(), await listener.receive()
            assert first["payloads"][0]["devices"][0]["power"] == {"1": "ON"}
            assert second["owner_id"] == alice_lamp.owner_id
            assert [p["devices"][0]["power"] for p in second["payloads"]] == [{"1": "ON"}]
            assert await listener.receive(timeout=0.3) is None

    try:
        run(scenario)
    finally:
        publisher.stop()
    assert publisher.sent == 2 and publisher.dropped == 0


def test_a_full_buffer_drops_the_oldest_and_asks_pages_to_resync(alice_lamp, alice_meter):
    publisher = live.BatchPublisher(max_groups=1, flush_interval=1.0)

    async def scenario() -> None:
        async with Listener(live.owner_group(alice_lamp.owner_id)) as listener:
            publisher.start()
            publisher.publish([with_power(alice_lamp, "ON")], [])
            assert await idle(publisher)
            await listener.receive()
            # One group fits: the lamp's state is pushed out by the meter's chart points.
            publisher.publish([with_power(alice_lamp, "OFF")], [])
            publisher.publish([], [event(alice_meter, data={"power": 1.0})])
            assert publisher.dropped == 1
            assert await idle(publisher)
            message = await listener.receive()
            assert message["payloads"] == [live.resync_message()]

    try:
        run(scenario)
    finally:
        publisher.stop()


def test_chart_points_per_device_are_capped_keeping_the_newest(alice_meter):
    publisher = live.BatchPublisher(flush_interval=1.0)

    async def scenario() -> None:
        async with Listener(live.device_group(alice_meter.pk)) as listener:
            publisher.start()
            publisher.publish([], [event(alice_meter, data={"power": -1.0})])
            assert await idle(publisher)
            await listener.receive()
            n = live.MAX_POINTS + 5
            publisher.publish([], [event(alice_meter, data={"power": float(i)}) for i in range(n)])
            assert await idle(publisher)
            points = (await listener.receive())["payloads"][0]["points"]
            assert len(points) == live.MAX_POINTS
            assert points[-1]["values"] == {"power": float(n - 1)}

    try:
        run(scenario)
    finally:
        publisher.stop()
    assert publisher.dropped == 5


def test_events_without_readings_send_nothing(alice_lamp):
    publisher = live.BatchPublisher()
    publisher.start()
    try:
        publisher.publish([], [event(alice_lamp, data={"fw": "1.2.0", "ok": True})])
        assert publisher.wait_idle(TIMEOUT)
    finally:
        publisher.stop()
    assert publisher.sent == 0


def test_a_dead_channel_layer_never_blocks_or_raises_into_the_listener(settings, alice_lamp):
    # Nothing listens on port 9: every send fails (connection refused) in the background.
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:9/0"]},
        }
    }
    publisher = live.BatchPublisher(flush_interval=0.01)
    publisher.start()
    try:
        for state in ("ON", "OFF", "ON"):
            publisher.publish([with_power(alice_lamp, state)], [])
        assert publisher.wait_idle(TIMEOUT)
    finally:
        publisher.stop()
    assert publisher.errors >= 1 and publisher.sent == 0


def test_publish_needs_start_and_stop_is_idempotent(alice_lamp):
    publisher = live.BatchPublisher()
    with pytest.raises(RuntimeError, match="start"):
        publisher.publish([alice_lamp], [])
    publisher.start()
    publisher.stop()
    publisher.stop()
    with pytest.raises(RuntimeError):
        publisher.publish([alice_lamp], [])


def test_publish_is_safe_from_several_threads(alice_lamp, alice_meter):
    publisher = live.BatchPublisher(flush_interval=0.01)

    def burst() -> None:
        for _ in range(20):
            publisher.publish([alice_lamp], [event(alice_meter, data={"power": 1.0})])

    async def scenario() -> None:
        async with Listener(live.device_group(alice_meter.pk)) as listener:
            publisher.start()
            threads = [threading.Thread(target=burst) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                await asyncio.to_thread(t.join)
            assert await idle(publisher)
            received = 0
            while (message := await listener.receive(timeout=0.5)) is not None:
                received += len(message["payloads"][0]["points"])
            assert received + publisher.dropped == 80

    try:
        run(scenario)
    finally:
        publisher.stop()
    assert publisher.errors == 0


def test_chart_values_reads_meters_and_tasmota_and_skips_non_numbers():
    assert live.chart_values({"voltage": 750, "current": 1.5, "ok": True, "mode": "dc"}) == {
        "voltage": 750.0,
        "current": 1.5,
    }
    tasmota = {"Time": "2024-01-01T00:00:00", "ENERGY": {"Total": 3.5, "Power": 60, "Voltage": 230}}
    assert live.chart_values(tasmota) == {"energy": 3.5, "power": 60.0, "voltage": 230.0}
    assert live.chart_values({"power": float("nan"), "energy": float("inf")}) == {}


def test_only_groups_a_socket_watches_are_sent_to(settings, tmp_path, alice_lamp, charlie_lamp):
    settings.CACHES = shared_cache_config(tmp_path)
    publisher = live.BatchPublisher(flush_interval=0.01)

    async def scenario() -> None:
        async with Listener(live.owner_group(alice_lamp.owner_id)) as listener:
            publisher.start()
            # charlie's group has news too, but no socket is in it.
            publisher.publish([with_power(alice_lamp, "ON"), with_power(charlie_lamp, "ON")], [])
            assert await idle(publisher)
            message = await listener.receive()
            assert message["owner_id"] == alice_lamp.owner_id

    try:
        run(scenario)
    finally:
        publisher.stop()
    assert (publisher.sent, publisher.unwatched) == (1, 1)


def test_a_watch_mark_lives_its_time_to_live(settings, tmp_path, monkeypatch):
    settings.CACHES = shared_cache_config(tmp_path)
    monkeypatch.setattr(live, "WATCH_TTL", 1)
    live.watch(["owner.1", "device.2"])
    assert live.watched(["owner.1", "device.2", "device.3"]) == {"owner.1", "device.2"}
    time.sleep(1.2)
    assert live.watched(["owner.1", "device.2"]) == set()


def test_a_cache_of_one_process_cannot_tell_so_every_group_counts_as_watched(settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    assert not live.watch_is_shared()
    assert live.watched(["owner.1", "device.2"]) == {"owner.1", "device.2"}


def test_an_unreachable_cache_sends_to_every_group(settings, alice_lamp, caplog):
    # Nothing listens on port 9: asking who watches fails; pages must still get their news.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:9/0",
        }
    }
    publisher = live.BatchPublisher(flush_interval=0.01)

    async def scenario() -> None:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(live.owner_group(alice_lamp.owner_id), channel)
        publisher.start()
        publisher.publish([with_power(alice_lamp, "ON")], [])
        assert await idle(publisher)
        message = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
        assert message["owner_id"] == alice_lamp.owner_id

    try:
        run(scenario)
    finally:
        publisher.stop()
    assert publisher.sent == 1 and "who watches is unknown" in caplog.text


def test_a_publishers_view_of_watchers_sees_a_new_mark_at_once(settings, tmp_path, monkeypatch):
    settings.CACHES = shared_cache_config(tmp_path)
    monkeypatch.setattr(live, "WATCH_TTL", 1)
    monkeypatch.setattr(live, "WATCH_RECHECK", 1.5)
    view = live.Watchers()
    assert view.filter(["owner.1", "device.2"]) == set()
    live.watch(["device.2"])  # a socket joins: the next flush must know
    assert view.filter(["owner.1", "device.2"]) == {"device.2"}
    time.sleep(1.2)  # the mark expired (the socket went away): still sent to for a while
    assert view.filter(["device.2"]) == {"device.2"}
    time.sleep(0.5)  # asked again after WATCH_RECHECK
    assert view.filter(["device.2"]) == set()
