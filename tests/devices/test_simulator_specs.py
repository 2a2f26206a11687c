"""Which devices the simulator plays: an owner's from the database, or synthetic ones."""

from __future__ import annotations

import re

import pytest

from apps.devices.models import DEVICE_ID_RE, Device, DeviceCredential, Profile
from apps.devices.simulator.meter_v2 import AC, DC
from apps.devices.simulator.specs import owner_specs, synthetic_specs


def test_synthetic_devices_have_valid_unique_ids_and_mixed_profiles():
    specs = synthetic_specs(9, "mixed", prefix="bench", interval=0.5)
    ids = [s.device_id for s in specs]
    assert len(set(ids)) == 9 and all(re.fullmatch(DEVICE_ID_RE, i) for i in ids)
    assert ids[:3] == ["bench-lamp-00001", "bench-tasmota-00002", "bench-meter-00003"]
    assert [s.profile for s in specs[:3]] == [Profile.ESP32_LAMP, Profile.TASMOTA, Profile.METER_V2]
    meters = [s for s in specs if s.profile == Profile.METER_V2]
    assert [(m.device_type, m.phases) for m in meters] == [(DC, 3), (AC, 3), (AC, 1)]
    assert all(s.interval == 0.5 for s in specs)


def test_synthetic_tasmota_relays_and_topic_order():
    (spec,) = synthetic_specs(1, "tasmota", relays=4, topic_order="topic")
    assert (spec.relay_count, spec.topic_order, spec.topic) == (4, "topic", spec.device_id)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "count"),
        ({"profile": "zigbee"}, "unknown profile"),
        ({"prefix": "Bad/Prefix"}, "prefix"),
        ({"relays": 9}, "relays"),
        ({"meter_type": "hvdc"}, "meter type"),
    ],
)
def test_synthetic_specs_refuse_bad_input(kwargs, message):
    args = {"count": 2, "profile": "mixed", **kwargs}
    with pytest.raises(ValueError, match=message):
        synthetic_specs(args.pop("count"), args.pop("profile"), **args)


def test_owner_specs_describe_the_owners_devices_only(
    alice_lamp, alice_relay, alice_meter, charlie_lamp
):
    alice_lamp.power = {"1": "ON"}
    alice_lamp.save()
    specs = {s.device_id: s for s in owner_specs("alice")}
    assert set(specs) == {"alice-lamp-1", "alice-relay-1", "alice-meter-1"}
    relay = specs["alice-relay-1"]
    assert (relay.topic, relay.relay_count, relay.topic_order, relay.interval) == (
        "tasmota_A1B2C3",
        2,
        "prefix",
        300.0,
    )
    assert specs["alice-lamp-1"].power == {"1": "ON"}
    assert specs["alice-meter-1"].device_type == DC  # "Traction DC meter"
    assert specs["alice-meter-1"].interval == 10.0


def test_owner_specs_filters_and_interval_override(alice_lamp, alice_relay, alice_meter):
    specs = owner_specs("alice", profile=Profile.TASMOTA, interval=0.2)
    assert [(s.device_id, s.interval) for s in specs] == [("alice-relay-1", 0.2)]
    specs = owner_specs("alice", device_ids=["alice-lamp-1", "alice-meter-1"])
    assert [s.device_id for s in specs] == ["alice-lamp-1", "alice-meter-1"]


def test_owner_specs_keep_a_meters_reported_type(alice_owner):
    Device.objects.create(
        owner=alice_owner,
        device_id="m-ac",
        name="Traction DC by name",
        profile=Profile.METER_V2,
        device_type=AC,
    )
    (spec,) = owner_specs("alice")
    assert spec.device_type == AC


def test_owner_specs_log_in_with_the_devices_live_credential_only(alice_lamp, alice_meter):
    DeviceCredential.objects.create(
        owner=alice_lamp.owner, device=alice_lamp, username="dev-alice-lamp-1", password="s3cret-pw"
    )
    revoked = DeviceCredential.objects.create(
        owner=alice_meter.owner, device=alice_meter, username="dev-alice-meter-1", password="old"
    )
    revoked.revoked_at = revoked.created_at
    revoked.save()
    specs = {s.device_id: s for s in owner_specs("alice")}
    assert (specs["alice-lamp-1"].username, specs["alice-lamp-1"].password) == (
        "dev-alice-lamp-1",
        "s3cret-pw",
    )
    assert (specs["alice-meter-1"].username, specs["alice-meter-1"].password) == ("", "")
    # paho must get the text itself: a Secret would go out as its mask.
    assert type(specs["alice-lamp-1"].password) is str
