"""The live WebSocket: who may connect, what the snapshot holds, and tenant isolation.

Everything goes through the real ASGI stack (origin check, session auth, routing) and the
configured channel layer (SQLite channels-lite embedded, Redis in CI), with events sent the
way the product sends them: `BatchPublisher` from the listener, `send_after_commit` from web.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import transaction
from django.utils import timezone

from apps.devices import events as ev
from apps.devices import live
from apps.devices.consumers import CLIENT_BURST, CLOSE_SCOPE_CHANGED
from apps.devices.models import Connection, Device
from apps.owners.models import Membership

from .live_helpers import (
    ALL_DATABASES,
    communicator,
    event,
    isolated_layer_config,
    session_cookie,
    shared_cache_config,
)

pytestmark = pytest.mark.django_db(transaction=True, databases=ALL_DATABASES)
TIMEOUT = 5


@pytest.fixture(autouse=True)
def _layer(settings, tmp_path):
    settings.CHANNEL_LAYERS = isolated_layer_config()
    # Shared, as in production: the publisher sends only to groups the sockets marked watched.
    settings.CACHES = shared_cache_config(tmp_path / "cache")


@pytest.fixture
def publisher(_layer):
    publisher = live.BatchPublisher(flush_interval=0.01)
    publisher.start()
    yield publisher
    publisher.stop()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run one async scenario on one loop; the ORM calls inside go back to this thread."""

    async def wrapped() -> None:
        try:
            await scenario()
        finally:
            close = getattr(get_channel_layer(), "close", None)
            if close:
                await close()

    async_to_sync(wrapped)()


async def open_socket(cookie: str) -> tuple[Any, dict[str, Any]]:
    socket = communicator(cookie)
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected
    snapshot = await socket.receive_json_from(timeout=TIMEOUT)
    assert snapshot["type"] == "snapshot"
    return socket, snapshot


def switched_off(device: Device) -> Device:
    Device.objects.filter(pk=device.pk).update(
        connection=Connection.ONLINE, power={"1": "OFF"}, last_seen_at=timezone.now()
    )
    return Device.objects.get(pk=device.pk)


def test_an_anonymous_socket_is_refused_before_accept(db):
    async def scenario() -> None:
        socket = communicator(None)
        connected, _ = await socket.connect(timeout=TIMEOUT)
        assert not connected

    run(scenario)


def test_a_socket_with_a_forged_session_is_refused(db):
    async def scenario() -> None:
        socket = communicator("sessionid=not-a-real-session")
        connected, _ = await socket.connect(timeout=TIMEOUT)
        assert not connected

    run(scenario)


def test_alices_snapshot_holds_only_her_devices(alice, alice_lamp, alice_meter, charlie_lamp):
    cookie = session_cookie(alice)

    async def scenario() -> None:
        socket, snapshot = await open_socket(cookie)
        assert {d["device_id"] for d in snapshot["devices"]} == {"alice-lamp-1", "alice-meter-1"}
        lamp = next(d for d in snapshot["devices"] if d["device_id"] == "alice-lamp-1")
        assert lamp == live.device_state(alice_lamp)
        await socket.disconnect()

    run(scenario)


def test_charlies_socket_receives_none_of_alices_published_events(
    alice, charlie, alice_lamp, alice_meter, charlie_lamp, publisher
):
    alice_cookie, charlie_cookie = session_cookie(alice), session_cookie(charlie)
    alice_off, charlie_off = switched_off(alice_lamp), switched_off(charlie_lamp)

    async def scenario() -> None:
        alice_socket, _ = await open_socket(alice_cookie)
        charlie_socket, snapshot = await open_socket(charlie_cookie)
        assert [d["device_id"] for d in snapshot["devices"]] == ["charlie-lamp-1"]
        # Charlie even asks for alice's meter stream; he must get a refusal, not a join.
        await charlie_socket.send_json_to({"type": "subscribe", "device": "alice-meter-1"})
        refusal = await charlie_socket.receive_json_from(timeout=TIMEOUT)
        assert refusal == live.error_message("not_found", "no such device", device="alice-meter-1")

        publisher.publish(
            [alice_off], [event(alice_meter, data={"voltage": 750.0, "power": 9000.0})]
        )
        delta = await alice_socket.receive_json_from(timeout=TIMEOUT)
        assert delta["type"] == "device"
        assert [d["power"] for d in delta["devices"]] == [{"1": "OFF"}]

        # Charlie's next message is his own event: nothing of alice's came before it.
        publisher.publish([charlie_off], [])
        first = await charlie_socket.receive_json_from(timeout=TIMEOUT)
        assert [d["device_id"] for d in first["devices"]] == ["charlie-lamp-1"]
        assert await charlie_socket.receive_nothing(timeout=0.5)
        await alice_socket.disconnect()
        await charlie_socket.disconnect()

    run(scenario)


def test_command_results_are_sent_after_commit_and_only_to_their_owner(
    alice, charlie, alice_lamp, charlie_lamp
):
    alice_cookie, charlie_cookie = session_cookie(alice), session_cookie(charlie)
    message = live.command_message(
        device_id="alice-lamp-1", command_id="c-1", action="OFF", status="confirmed"
    )

    def rolled_back() -> None:
        with pytest.raises(RuntimeError), transaction.atomic():
            live.send_after_commit(alice_lamp.owner_id, alice_lamp.pk, message)
            raise RuntimeError("the command was not saved")

    def committed() -> None:
        with transaction.atomic():
            live.send_after_commit(alice_lamp.owner_id, alice_lamp.pk, message)

    async def scenario() -> None:
        alice_socket, _ = await open_socket(alice_cookie)
        charlie_socket, _ = await open_socket(charlie_cookie)

        await sync_to_async(rolled_back)()
        assert await alice_socket.receive_nothing(timeout=0.5)

        await sync_to_async(committed)()
        assert await alice_socket.receive_json_from(timeout=TIMEOUT) == message
        assert await charlie_socket.receive_nothing(timeout=0.5)
        await alice_socket.disconnect()
        await charlie_socket.disconnect()

    run(scenario)


def test_a_device_page_gets_its_chart_points_after_subscribing(alice, alice_meter, publisher):
    cookie = session_cookie(alice)
    readings = {"voltage": 750.5, "current": 120.0, "power": 90060.0, "energy": 12.5}

    async def scenario() -> None:
        socket, _ = await open_socket(cookie)
        # Not subscribed yet: the dashboard does not get every chart point.
        publisher.publish([], [event(alice_meter, data=readings)])
        assert await socket.receive_nothing(timeout=0.5)

        await socket.send_json_to({"type": "subscribe", "device": "alice-meter-1"})
        assert await socket.receive_json_from(timeout=TIMEOUT) == {
            "type": "subscribed",
            "device": "alice-meter-1",
        }
        publisher.publish([], [event(alice_meter, data=readings)])
        message = await socket.receive_json_from(timeout=TIMEOUT)
        assert message["type"] == "telemetry"
        assert message["device"] == "alice-meter-1"
        assert [p["values"] for p in message["points"]] == [readings]
        await socket.disconnect()

    run(scenario)


def test_transitions_reach_the_device_page(alice, alice_lamp, publisher):
    cookie = session_cookie(alice)
    change = {"old": "ON", "new": "OFF", "cause": "status", "relay": 1}

    async def scenario() -> None:
        socket, _ = await open_socket(cookie)
        await socket.send_json_to({"type": "subscribe", "device": "alice-lamp-1"})
        await socket.receive_json_from(timeout=TIMEOUT)
        publisher.publish([], [event(alice_lamp, ev.POWER, change)])
        message = await socket.receive_json_from(timeout=TIMEOUT)
        assert message["type"] == "transition"
        assert message["transitions"][0] | {"at": None} == {
            "kind": "power",
            "relay": 1,
            "old": "ON",
            "new": "OFF",
            "cause": "status",
            "at": None,
        }
        await socket.disconnect()

    run(scenario)


def test_ping_answers_pong(alice):
    cookie = session_cookie(alice)

    async def scenario() -> None:
        socket, _ = await open_socket(cookie)
        await socket.send_json_to({"type": "ping"})
        assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}
        await socket.disconnect()

    run(scenario)


def test_a_removed_member_is_disconnected_at_the_next_ping(bob, alice_lamp):
    cookie = session_cookie(bob)

    async def scenario() -> None:
        socket, snapshot = await open_socket(cookie)
        assert [d["device_id"] for d in snapshot["devices"]] == ["alice-lamp-1"]
        await sync_to_async(Membership.objects.filter(user=bob).delete)()
        await socket.send_json_to({"type": "ping"})
        closed = await socket.receive_output(timeout=TIMEOUT)
        assert closed == {"type": "websocket.close", "code": CLOSE_SCOPE_CHANGED}

    run(scenario)


def test_bad_client_messages_get_an_error_and_keep_the_socket(alice):
    cookie = session_cookie(alice)

    async def scenario() -> None:
        socket, _ = await open_socket(cookie)
        await socket.send_to(text_data="{not json")
        assert (await socket.receive_json_from(timeout=TIMEOUT))["error"] == "bad_request"
        await socket.send_json_to({"type": "subscribe", "device": 42})
        assert (await socket.receive_json_from(timeout=TIMEOUT))["error"] == "bad_request"
        await socket.send_json_to({"type": "nonsense"})
        assert (await socket.receive_json_from(timeout=TIMEOUT))["error"] == "bad_request"
        await socket.send_json_to({"type": "ping"})
        assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}
        await socket.disconnect()

    run(scenario)


def test_a_snapshot_can_be_requested_again(alice, alice_lamp):
    cookie = session_cookie(alice)

    async def scenario() -> None:
        socket, first = await open_socket(cookie)
        await sync_to_async(switched_off)(alice_lamp)
        await socket.send_json_to({"type": "snapshot"})
        again = await socket.receive_json_from(timeout=TIMEOUT)
        assert again["type"] == "snapshot"
        assert first["devices"][0]["power"] == {}
        assert again["devices"][0]["power"] == {"1": "OFF"}
        await socket.disconnect()

    run(scenario)


def test_a_flood_of_client_messages_is_rate_limited(alice, charlie_lamp):
    cookie = session_cookie(alice)
    flood = CLIENT_BURST + 10

    async def scenario() -> None:
        socket, _ = await open_socket(cookie)
        for _ in range(flood):
            await socket.send_json_to({"type": "subscribe", "device": "charlie-lamp-1"})
        errors = [(await socket.receive_json_from(timeout=TIMEOUT))["error"] for _ in range(flood)]
        assert set(errors) == {"not_found", "rate_limited"}
        assert errors[:CLIENT_BURST] == ["not_found"] * CLIENT_BURST
        await socket.disconnect()

    run(scenario)


def test_an_envelope_of_another_owner_is_not_forwarded_even_in_our_group(
    alice, charlie, alice_lamp, charlie_lamp
):
    """Defence in depth: a sender bug that names the wrong group must still not leak."""
    cookie = session_cookie(charlie)
    leaked = live.envelope(alice_lamp.owner_id, [live.devices_message([{"id": 1}])])

    async def scenario() -> None:
        socket, _ = await open_socket(cookie)
        layer = get_channel_layer()
        await layer.group_send(live.owner_group(charlie_lamp.owner_id), leaked)
        assert await socket.receive_nothing(timeout=0.5)
        await socket.disconnect()

    run(scenario)


def test_a_socket_keeps_its_groups_watched_while_connected(alice, alice_meter, monkeypatch):
    monkeypatch.setattr(live, "WATCH_TTL", 1)
    monkeypatch.setattr(live, "WATCH_RENEW", 0.2)
    cookie = session_cookie(alice)
    groups = {live.owner_group(alice_meter.owner_id), live.device_group(alice_meter.pk)}
    unwatched = live.owner_group(alice_meter.owner_id + 1000)

    async def scenario() -> None:
        socket, _ = await open_socket(cookie)
        await socket.send_json_to({"type": "subscribe", "device": "alice-meter-1"})
        await socket.receive_json_from(timeout=TIMEOUT)
        await asyncio.sleep(1.5)  # longer than a mark lives: renewed meanwhile
        assert await sync_to_async(live.watched)([*groups, unwatched]) == groups
        await socket.disconnect()
        await asyncio.sleep(1.2)  # no renewal after the socket went away
        assert await sync_to_async(live.watched)(groups) == set()

    run(scenario)


def test_nobody_watching_costs_no_sends_and_a_page_opened_later_gets_news(
    alice, alice_lamp, publisher
):
    cookie = session_cookie(alice)

    async def scenario() -> None:
        publisher.publish([await sync_to_async(switched_off)(alice_lamp)], [])
        assert await sync_to_async(publisher.wait_idle)(TIMEOUT)
        assert publisher.unwatched == 1 and publisher.sent == 0
        socket, snapshot = await open_socket(cookie)
        assert snapshot["devices"][0]["power"] == {"1": "OFF"}  # what was not sent is here
        publisher.publish([await sync_to_async(switched_off)(alice_lamp)], [])
        message = await socket.receive_json_from(timeout=TIMEOUT)
        assert message["type"] == "device" and publisher.sent == 1
        await socket.disconnect()

    run(scenario)


def test_metrics_count_the_sockets_this_process_holds(alice, bob):
    from apps.core import metrics
    from tests.core.test_health import parse

    def clients() -> float:
        return parse(metrics.render().decode())["iot_websocket_clients"][()]

    alice_cookie, bob_cookie = session_cookie(alice), session_cookie(bob)

    async def scenario() -> None:
        before = await sync_to_async(clients)()
        refused = communicator(None)  # never accepted: never counted
        assert not (await refused.connect(timeout=TIMEOUT))[0]
        first, _ = await open_socket(alice_cookie)
        second, _ = await open_socket(bob_cookie)
        assert await sync_to_async(clients)() == before + 2
        await first.disconnect()
        assert await sync_to_async(clients)() == before + 1
        await second.disconnect()
        assert await sync_to_async(clients)() == before

    run(scenario)
