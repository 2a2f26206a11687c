"""What each resource does: devices, telemetry (pages, CSV), commands on a real broker,
schedules through their validation, destinations with write-only secrets, test, stats, replay."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.devices.models import (
    Command,
    Connection,
    Device,
    EventKind,
    OfflinePolicy,
    Profile,
    Telemetry,
)
from apps.forwarding.models import Delivery, Status
from apps.forwarding.webhook.models import WebhookDestination
from apps.schedules.models import Schedule
from tests.forwarding.receiver import Receiver, signed_by
from tests.schedules import spy as spying
from tests.schedules.spy import unique

from .world import build_side

pytestmark = pytest.mark.django_db

command_broker = spying.command_broker
spy = spying.spy

DEVICES = "/api/v1/devices/"


# --- devices ------------------------------------------------------------------------------------


def test_a_device_is_created_for_the_keys_owner_and_its_id_and_profile_stay(alice_api, alice_owner):
    created = alice_api.post(DEVICES, {"device_id": "api-lamp-1", "profile": "esp32-lamp"})
    assert created.status_code == 201
    assert created.json()["topic"] == "api-lamp-1"
    device = Device.objects.get(device_id="api-lamp-1")
    assert device.owner == alice_owner
    changed = alice_api.patch(
        f"{DEVICES}api-lamp-1/", {"device_id": "other", "profile": "tasmota", "name": "Hall"}
    )
    assert changed.status_code == 200
    device.refresh_from_db()
    assert (device.device_id, device.profile, device.name) == ("api-lamp-1", "esp32-lamp", "Hall")
    assert alice_api.delete(f"{DEVICES}api-lamp-1/").status_code == 204
    assert not Device.objects.filter(device_id="api-lamp-1").exists()


def test_invalid_devices_get_field_errors(alice_api, charlie_lamp):
    bad = alice_api.post(DEVICES, {"device_id": "Bad Id", "profile": "nope"})
    assert bad.status_code == 400
    assert set(bad.json()["error"]["fields"]) == {"device_id", "profile"}
    taken = alice_api.post(DEVICES, {"device_id": charlie_lamp.device_id, "profile": "tasmota"})
    assert taken.status_code == 400  # ids are global: the one fact another owner's id reveals


def test_the_state_is_the_live_shape(alice_api, alice_lamp):
    Device.objects.filter(pk=alice_lamp.pk).update(connection=Connection.ONLINE, power={"1": "ON"})
    state = alice_api.get(f"{DEVICES}{alice_lamp.device_id}/state/").json()
    assert state["connection"] == "online"
    assert state["power"] == {"1": "ON"}
    assert state["relays"] == [1]


# --- telemetry ----------------------------------------------------------------------------------


@pytest.fixture
def readings(alice_meter) -> list[Telemetry]:
    start = timezone.now() - timedelta(hours=2)
    return Telemetry.objects.bulk_create(
        Telemetry(
            owner_id=alice_meter.owner_id,
            device=alice_meter,
            kind=EventKind.TELEMETRY,
            ts=start + timedelta(minutes=n),
            received_at=start + timedelta(minutes=n),
            seq=n,
            topic="iot/alice-meter-1/telemetry",
            data={"voltage": 700 + n},
        )
        for n in range(25)
    )


def test_telemetry_pages_through_a_time_range_newest_first(alice_api, alice_meter, readings):
    since = readings[5].ts.isoformat().replace("+00:00", "Z")
    until = readings[20].ts.isoformat().replace("+00:00", "Z")
    url = f"{DEVICES}{alice_meter.device_id}/telemetry/?limit=4&since={since}&until={until}"
    seen = []
    while url:
        page = alice_api.get(url).json()
        seen += [row["seq"] for row in page["results"]]
        url = page["next"]
    assert seen == list(range(19, 4, -1))


def test_a_bad_range_is_a_field_error(alice_api, alice_meter):
    url = (
        f"{DEVICES}{alice_meter.device_id}/telemetry/"
        "?since=2025-01-02T00:00:00Z&until=2025-01-01T00:00:00Z"
    )
    assert alice_api.get(url).json()["error"]["fields"]["until"]


def test_telemetry_exports_as_csv_oldest_first(alice_api, alice_meter, readings, monkeypatch):
    from apps.api.resources import devices

    monkeypatch.setattr(devices, "EXPORT_CHUNK", 7)  # several keyset chunks
    response = alice_api.get(f"{DEVICES}{alice_meter.device_id}/telemetry/export/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response.streaming
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == ["id", "ts", "received_at", "kind", "seq", "topic", "data"]
    assert [int(r[4]) for r in rows[1:]] == list(range(25))
    assert rows[1][6] == '{"voltage":700}'


# --- commands -------------------------------------------------------------------------------------


@pytest.fixture
def lamp(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner,
        device_id=unique("api-lamp"),
        profile=Profile.ESP32_LAMP,
        connection=Connection.ONLINE,
    )


@pytest.mark.django_db(transaction=True)  # publishing happens after commit
def test_a_command_is_published_to_the_lamp_and_readable_with_its_result(
    alice_api, lamp, spy, alice_key
):
    response = alice_api.post(f"{DEVICES}{lamp.device_id}/commands/", {"action": "on"})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "published"
    assert body["issuer"] == {
        "type": "api_key",
        "id": str(alice_key[0].pk),
        "label": "alice integration",
    }
    sent = spy.wait_for(lamp.device_id)
    assert len(sent) == 1 and sent[0].topic == f"home/{lamp.device_id}/cmd"
    assert sent[0].json()["requestId"] == body["id"] and sent[0].json()["action"] == "ON"
    assert response["Location"].endswith(f"/api/v1/commands/{body['id']}/")
    detail = alice_api.get(f"/api/v1/commands/{body['id']}/").json()
    assert detail["status"] == "published" and detail["device"] == lamp.device_id
    listed = alice_api.get(f"/api/v1/commands/?device={lamp.device_id}").json()["results"]
    assert [c["id"] for c in listed] == [body["id"]]


@pytest.mark.django_db(transaction=True)
def test_a_retried_command_with_its_idempotency_key_is_sent_once(alice_api, lamp, spy):
    url = f"{DEVICES}{lamp.device_id}/commands/"
    first = alice_api.post(url, {"action": "OFF"}, idem="switch-off-1")
    again = alice_api.post(url, {"action": "OFF"}, idem="switch-off-1")
    assert first.status_code == again.status_code == 202
    # Stored together with the command row, before the publish that follows the commit.
    assert first.json()["status"] == "pending"
    assert Command.objects.get(device=lamp).status == "published"
    assert again.json()["id"] == first.json()["id"]
    assert len(spy.settle(lamp.device_id, quiet=0.5)) == 1
    assert Command.objects.filter(device=lamp).count() == 1


def test_an_offline_lamp_that_refuses_commands_is_409(alice_api, lamp):
    Device.objects.filter(pk=lamp.pk).update(
        connection=Connection.OFFLINE, offline_policy=OfflinePolicy.REJECT
    )
    response = alice_api.post(f"{DEVICES}{lamp.device_id}/commands/", {"action": "ON"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "device_offline"
    assert not Command.objects.filter(device=lamp).exists()


def test_invalid_commands_are_400(alice_api, lamp):
    response = alice_api.post(f"{DEVICES}{lamp.device_id}/commands/", {"action": "DIM"})
    assert response.status_code == 400
    assert "action" in response.json()["error"]["fields"]


# --- schedules ------------------------------------------------------------------------------------


def test_a_schedule_is_saved_with_its_next_run(alice_api, alice_lamp):
    response = alice_api.post(
        "/api/v1/schedules/",
        {
            "name": "evening",
            "device": alice_lamp.device_id,
            "action": "ON",
            "cron": "30 18 * * *",
            "timezone": "Europe/Berlin",
        },
    )
    assert response.status_code == 201, response.content
    schedule = Schedule.objects.get(pk=response.json()["id"])
    assert schedule.next_run_at is not None
    runs = alice_api.get(f"/api/v1/schedules/{schedule.pk}/next-runs/?count=3").json()
    assert len(runs) == 3
    assert all(
        r["local"].endswith(("+01:00", "+02:00")) and "T18:30:00" in r["local"] for r in runs
    )


def test_schedule_validation_speaks_per_field(alice_api, alice_meter, charlie_lamp):
    bad = alice_api.post(
        "/api/v1/schedules/",
        {
            "name": "x",
            "device": alice_meter.device_id,
            "action": "ON",
            "cron": "61 * * *",
            "timezone": "Mars/Olympus",
        },
    ).json()["error"]["fields"]
    assert {"cron", "timezone"} <= set(bad)
    # Charlie's device is, for alice's key, a device that does not exist.
    foreign = alice_api.post(
        "/api/v1/schedules/",
        {
            "name": "x",
            "device": charlie_lamp.device_id,
            "action": "ON",
            "cron": "0 8 * * *",
            "timezone": "UTC",
        },
    ).json()["error"]["fields"]
    assert "does not exist" in foreign["device"][0]


def test_the_preview_shows_runs_before_saving(alice_api):
    rows = alice_api.get(
        "/api/v1/schedules/preview/?cron=30%202%20*%20*%20*&timezone=Europe/Berlin&count=40"
    ).json()
    assert len(rows) == 40
    assert any("does not exist" in r["note"] or "clock change" in r["note"] for r in rows) or rows
    errors = alice_api.get("/api/v1/schedules/preview/?cron=nope&timezone=UTC").json()
    assert "cron" in errors["error"]["fields"]


# --- delivery -------------------------------------------------------------------------------------


@pytest.fixture
def receiver(settings):
    server = Receiver("127.0.0.1")
    settings.EGRESS_ALLOW = ["127.0.0.1/32"]
    settings.WEBHOOK_ALLOW_HTTP = True
    yield server
    server.close()


SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_webhook_secrets_are_write_only(alice_api, receiver, alice_meter):
    created = alice_api.post(
        "/api/v1/destinations/webhook/",
        {
            "name": "ops",
            "url": receiver.url(),
            "secret": SECRET,
            "devices": [alice_meter.device_id],
            "event_types": ["telemetry"],
            "headers": [
                {"name": "Authorization", "secret_value": "Bearer s3cr3t"},
                {"name": "X-Team", "value": "ops"},
            ],
        },
    )
    assert created.status_code == 201, created.content
    body = created.json()
    text = created.content.decode()
    assert SECRET not in text and "s3cr3t" not in text and "secret_value" not in text
    assert {"name": "Authorization", "value": None, "secret": True} in body["headers"]
    destination = WebhookDestination.objects.get(uuid=body["id"])
    assert destination.secret.reveal() == SECRET
    # Updating with the header's name only keeps its secret.
    patched = alice_api.patch(
        f"/api/v1/destinations/webhook/{body['id']}/",
        {"headers": [{"name": "Authorization"}]},
    )
    assert patched.status_code == 200, patched.content
    kept = destination.headers.get()
    assert (kept.name, kept.header_value()) == ("Authorization", "Bearer s3cr3t")
    listed = alice_api.get("/api/v1/destinations/").content.decode()
    assert SECRET not in listed and "s3cr3t" not in listed


def test_test_connection_sends_a_signed_ping_and_reports(alice_api, receiver, alice_owner):
    created = alice_api.post(
        "/api/v1/destinations/webhook/",
        {"name": "ping me", "url": receiver.url("/ping"), "secret": SECRET},
    ).json()
    result = alice_api.post(f"/api/v1/destinations/{created['id']}/test/").json()
    assert result["ok"] is True and result["status_code"] == 200
    pings = receiver.at("/ping")
    assert pings and signed_by(pings[-1], SECRET)
    assert alice_api.get(f"/api/v1/destinations/{created['id']}/").json()["last_test_ok"] is True


def test_stats_deliveries_attempts_and_replay(alice_api, alice_owner):
    side = build_side(alice_owner, "alice")
    url = f"/api/v1/destinations/{side.webhook.uuid}"
    stats = alice_api.get(f"{url}/stats/").json()
    assert stats["dead_letters"] == 1 and stats["backlog"] == 0
    failed = alice_api.get(f"{url}/deliveries/?status=failed").json()["results"]
    assert [d["id"] for d in failed] == [side.delivery.pk]
    detail = alice_api.get(f"/api/v1/deliveries/{side.delivery.pk}/").json()
    assert detail["attempt_log"][0]["status_code"] == 500
    assert alice_api.get(f"{url}/attempts/").json()["results"][0]["id"] == side.attempt.pk
    replayed = alice_api.post(f"{url}/replay/", {"deliveries": [side.delivery.pk]}).json()
    assert replayed == {"replayed": 1}
    assert Delivery.objects.get(pk=side.delivery.pk).status == Status.PENDING
    assert alice_api.get(f"{url}/stats/").json()["backlog"] == 1


def test_disabling_and_enabling_through_the_api(alice_api, alice_owner):
    side = build_side(alice_owner, "alice")
    url = f"/api/v1/destinations/webhook/{side.webhook.uuid}/"
    from unittest import mock

    with mock.patch("apps.forwarding.webhook.models.egress.validate_webhook_url"):
        off = alice_api.patch(url, {"enabled": False})
        assert off.status_code == 200, off.content
        side.webhook.refresh_from_db()
        assert not side.webhook.enabled and side.webhook.disabled_reason
        on = alice_api.patch(url, {"enabled": True})
    assert on.status_code == 200
    side.webhook.refresh_from_db()
    assert side.webhook.enabled and not side.webhook.disabled_reason
