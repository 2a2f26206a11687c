"""`manage.py seed_demo`: the demo that `make run` prints a login for."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.core.management.commands.seed_demo import DEMO_DEVICES
from apps.devices.models import Connection, Device, Profile, TasmotaTopicOrder
from apps.owners.models import Membership, Owner, Role
from apps.owners.scoping import scope

pytestmark = pytest.mark.django_db


def seed() -> str:
    out = StringIO()
    call_command("seed_demo", stdout=out)
    return out.getvalue()


def test_it_creates_the_demo_owner_login_and_devices_of_every_profile() -> None:
    seed()
    owner = Owner.objects.get(slug="demo")
    assert (owner.name, owner.timezone) == ("Demo Home", "Asia/Jakarta")

    demo = get_user_model().objects.get(username="demo")
    assert demo.check_password("demo-pass")
    assert demo.is_staff and not demo.is_superuser
    assert Membership.objects.get(owner=owner, user=demo).role == Role.OWNER

    devices = {d.device_id: d for d in Device.objects.filter(owner=owner)}
    assert set(devices) == {
        "demo-lamp-1",
        "demo-lamp-2",
        "demo-lamp-3",
        "demo-plug-1",
        "demo-relay4",
        "demo-meter-dc",
        "demo-meter-ac",
    }
    assert {d.profile for d in devices.values()} == set(Profile.values)
    plug, relay4 = devices["demo-plug-1"], devices["demo-relay4"]
    assert (plug.topic, plug.relay_count, plug.topic_order) == (
        "tasmota_plug1",
        1,
        TasmotaTopicOrder.PREFIX_FIRST,
    )
    assert (relay4.topic, relay4.relay_count, relay4.topic_order) == (
        "tasmota_relay4",
        4,
        TasmotaTopicOrder.TOPIC_FIRST,
    )
    assert devices["demo-lamp-1"].topic == "demo-lamp-1"
    assert devices["demo-meter-ac"].device_type == "power_meter_ac"
    # The demo user sees exactly the demo devices through the one scoping rule.
    assert set(scope(Device.objects.all(), demo).values_list("device_id", flat=True)) == set(
        devices
    )


def test_running_it_twice_duplicates_nothing_and_keeps_device_state() -> None:
    seed()
    lamp = Device.objects.get(device_id="demo-lamp-1")
    lamp.connection, lamp.power, lamp.name = Connection.ONLINE, {"1": "ON"}, "renamed"
    lamp.save()

    output = seed()

    assert Owner.objects.filter(slug="demo").count() == 1
    assert get_user_model().objects.filter(username="demo").count() == 1
    assert Membership.objects.filter(owner__slug="demo").count() == 1
    assert Device.objects.filter(owner__slug="demo").count() == len(DEMO_DEVICES)
    lamp.refresh_from_db()
    assert lamp.name == "Living room lamp"  # configuration restored
    assert (lamp.connection, lamp.power) == (Connection.ONLINE, {"1": "ON"})  # state kept
    assert "0 new" in output


def test_it_resets_the_demo_password_to_the_configured_one(settings) -> None:
    seed()
    settings.DEMO_PASSWORD = "another-demo-secret"
    seed()
    assert get_user_model().objects.get(username="demo").check_password("another-demo-secret")


def test_it_creates_a_superuser_only_when_an_admin_password_is_set(settings) -> None:
    users = get_user_model().objects
    seed()
    assert not users.filter(username="admin").exists()
    assert not users.filter(is_superuser=True).exists()

    settings.DEMO_ADMIN_PASSWORD = "admin-secret-123"
    seed()
    admin = users.get(username="admin")
    assert admin.is_superuser and admin.check_password("admin-secret-123")


def test_it_refuses_to_take_over_another_owners_device(charlie_owner) -> None:
    Device.objects.create(owner=charlie_owner, device_id="demo-lamp-2", profile=Profile.ESP32_LAMP)
    with pytest.raises(CommandError, match="already belongs"):
        seed()
    # All or nothing: the failed seed left no half-built demo behind.
    assert not Owner.objects.filter(slug="demo").exists()
    assert Device.objects.get(device_id="demo-lamp-2").owner == charlie_owner
