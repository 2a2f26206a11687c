"""The live pages: dashboard and device page, scoped by owner, rendered from live state."""

from __future__ import annotations

import json
from datetime import timedelta

from django.urls import reverse
from django.utils import timezone

from apps.devices.models import Connection, Device, EventKind, Profile, Telemetry, Transition


def _reading(device: Device, minutes_ago: float, **data: float) -> Telemetry:
    ts = timezone.now() - timedelta(minutes=minutes_ago)
    return Telemetry.objects.create(
        owner_id=device.owner_id,
        device=device,
        kind=EventKind.TELEMETRY,
        ts=ts,
        received_at=ts,
        topic=f"iot/{device.device_id}/telemetry",
        data=data,
    )


def test_the_dashboard_sends_anonymous_users_to_the_admin_login(client, db):
    response = client.get(reverse("dashboard"))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_the_dashboard_lists_only_the_users_own_devices(
    client, alice, alice_lamp, alice_meter, charlie_lamp
):
    client.force_login(alice)

    response = client.get(reverse("dashboard"))

    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-device="alice-lamp-1"' in html
    assert 'data-device="alice-meter-1"' in html
    assert "charlie-lamp-1" not in html
    assert "Charlie" not in html


def test_charlie_sees_only_his_device_on_the_dashboard(client, charlie, alice_lamp, charlie_lamp):
    client.force_login(charlie)

    html = client.get(reverse("dashboard")).content.decode()

    assert 'data-device="charlie-lamp-1"' in html
    assert "alice-lamp-1" not in html


def test_a_tile_shows_connection_power_per_relay_reading_and_last_seen(client, alice, alice_relay):
    Device.objects.filter(pk=alice_relay.pk).update(
        connection=Connection.ONLINE,
        power={"1": "ON", "2": "OFF"},
        last_seen_at=timezone.now() - timedelta(seconds=12),
        last_reading={"ENERGY": {"Voltage": 230.4, "Power": 61.25, "Total": 3.5}},
    )
    client.force_login(alice)

    html = client.get(reverse("dashboard")).content.decode()

    assert 'data-connection="online"' in html
    assert 'data-relay="1" data-power="ON"' in html
    assert 'data-relay="2" data-power="OFF"' in html
    assert "230.4" in html and "61.25" in html
    assert "kWh" in html  # Tasmota's Total is shown as energy
    assert "12 s ago" in html or "13 s ago" in html


def test_teammate_bob_sees_alices_devices(client, bob, alice_lamp):
    client.force_login(bob)

    html = client.get(reverse("dashboard")).content.decode()

    assert 'data-device="alice-lamp-1"' in html


def test_charlie_gets_404_for_alices_device_page(client, charlie, alice_lamp):
    client.force_login(charlie)

    response = client.get(reverse("device-detail", args=[alice_lamp.device_id]))

    assert response.status_code == 404


def test_an_unknown_device_page_is_404_like_a_foreign_one(client, alice):
    client.force_login(alice)

    response = client.get(reverse("device-detail", args=["no-such-device"]))

    assert response.status_code == 404


def test_the_device_page_seeds_the_chart_from_recent_telemetry(client, alice, alice_meter):
    _reading(alice_meter, 180, voltage=1.0)  # outside the chart window
    _reading(alice_meter, 10, voltage=750.5, current=120.0, power=90060.0, energy=12.5)
    _reading(alice_meter, 5, voltage=748.0, current=118.5, power=88638.0, energy=12.6)
    Transition.objects.create(
        owner_id=alice_meter.owner_id,
        device=alice_meter,
        kind="connection",
        old="unknown",
        new="online",
        cause="status",
        at=timezone.now(),
    )
    client.force_login(alice)

    response = client.get(reverse("device-detail", args=[alice_meter.device_id]))

    assert response.status_code == 200
    html = response.content.decode()
    seed = html.split('id="chart-points" type="application/json">')[1].split("</script>")[0]
    points = json.loads(seed)
    assert [p["values"]["voltage"] for p in points] == [750.5, 748.0]  # oldest first
    assert "online" in html and "status" in html  # the transition row


def test_device_page_text_from_devices_is_escaped(client, alice, alice_owner):
    Device.objects.create(
        owner=alice_owner,
        device_id="alice-xss",
        name="<script>alert(1)</script>",
        profile=Profile.ESP32_LAMP,
        firmware='"><img src=x>',
    )
    client.force_login(alice)

    html = client.get(reverse("device-detail", args=["alice-xss"])).content.decode()

    assert "<script>alert(1)</script>" not in html
    assert '"><img src=x>' not in html


def test_readings_show_in_the_devices_units_with_a_readable_prefix(
    client, alice, alice_meter, alice_relay
):
    # meter-v2 reports kW and kWh; Tasmota reports W (docs/protocols.md).
    Device.objects.filter(pk=alice_meter.pk).update(
        last_reading={"voltage": 815.7, "current": 63.4, "power": 1500.0, "energy": 2782510.566}
    )
    Device.objects.filter(pk=alice_relay.pk).update(last_reading={"ENERGY": {"Power": 1500}})
    client.force_login(alice)

    html = client.get(reverse("dashboard")).content.decode()

    meter = html.split('data-device="alice-meter-1"')[1].split("</article>")[0]
    relay = html.split('data-device="alice-relay-1"')[1].split("</article>")[0]
    assert '<span class="value">1.5</span> <span class="unit">MW</span>' in meter
    assert '<span class="value">2.78</span> <span class="unit">GWh</span>' in meter
    assert '<span class="value">1.5</span> <span class="unit">kW</span>' in relay
