"""The fixture world: owner alice (with teammate bob) and outsider charlie."""

from __future__ import annotations

import pytest

from apps.devices.models import Device, Profile
from apps.owners.models import Membership, Owner, Role


@pytest.fixture
def alice_owner(db) -> Owner:
    return Owner.objects.create(name="Alice Lamps", slug="alice", timezone="Europe/Berlin")


@pytest.fixture
def charlie_owner(db) -> Owner:
    return Owner.objects.create(name="Charlie Meters", slug="charlie", timezone="Asia/Jakarta")


@pytest.fixture
def alice(django_user_model, alice_owner):
    user = django_user_model.objects.create_user("alice", "alice@example.com", "alice-pass-123")
    Membership.objects.create(owner=alice_owner, user=user, role=Role.OWNER)
    return user


@pytest.fixture
def bob(django_user_model, alice_owner):
    """Alice's teammate, a viewer: may look, may not switch or configure."""
    user = django_user_model.objects.create_user("bob", "bob@example.com", "bob-pass-123")
    Membership.objects.create(owner=alice_owner, user=user, role=Role.VIEWER)
    return user


@pytest.fixture
def charlie(django_user_model, charlie_owner):
    user = django_user_model.objects.create_user("charlie", "charlie@example.com", "charlie-pass-123")
    Membership.objects.create(owner=charlie_owner, user=user, role=Role.OWNER)
    return user


@pytest.fixture
def alice_lamp(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner, device_id="alice-lamp-1", name="Living room", profile=Profile.ESP32_LAMP
    )


@pytest.fixture
def alice_relay(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner, device_id="alice-relay-1", name="Garden relay",
        profile=Profile.TASMOTA, topic="tasmota_A1B2C3", relay_count=2, expected_interval=300,
    )


@pytest.fixture
def alice_meter(alice_owner) -> Device:
    return Device.objects.create(
        owner=alice_owner, device_id="alice-meter-1", name="Traction DC meter",
        profile=Profile.METER_V2, expected_interval=10,
    )


@pytest.fixture
def charlie_lamp(charlie_owner) -> Device:
    return Device.objects.create(
        owner=charlie_owner, device_id="charlie-lamp-1", name="Charlie's lamp",
        profile=Profile.ESP32_LAMP,
    )
