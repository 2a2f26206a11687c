"""Schedule validation: clear field errors, a sane limit per device, next_run_at in UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from django.core.exceptions import ValidationError

from apps.devices.models import Device
from apps.schedules import actions
from apps.schedules.models import DeviceGroup, Schedule

pytestmark = pytest.mark.django_db


def schedule(owner, **fields) -> Schedule:
    defaults = {"name": "evening", "action": "ON", "cron": "30 18 * * *", "timezone": "UTC"}
    return Schedule(owner=owner, **{**defaults, **fields})


def errors(s: Schedule) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as exc:
        actions.save_schedule(s)
    return exc.value.message_dict


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"cron": "0 30 18 * * *"}, "cron", "exactly 5 fields"),
        ({"cron": "30 25 * * *"}, "cron", "hour: 25 is out of range"),
        ({"cron": "0 0 30 2 *"}, "cron", "never matches"),
        ({"timezone": "Europe/Berlinn"}, "timezone", "not an IANA time zone"),
        ({"timezone": "CET+1"}, "timezone", "not an IANA time zone"),
        ({"starts_on": date(2026, 5, 2), "ends_on": date(2026, 5, 1)}, "ends_on", "before"),
        ({"relay": 9}, "relay", "between 1 and 8"),
    ],
)
def test_field_errors(alice_lamp, fields, field, message):
    found = errors(schedule(alice_lamp.owner, device=alice_lamp, **fields))
    assert any(message in m for m in found[field]), found


def test_exactly_one_target(alice_owner, alice_lamp):
    group = DeviceGroup.objects.create(owner=alice_owner, name="all")
    assert "device" in errors(schedule(alice_owner))
    assert "device" in errors(schedule(alice_owner, device=alice_lamp, group=group))


def test_a_device_of_another_owner_is_refused(alice_owner, charlie_lamp):
    found = errors(schedule(alice_owner, device=charlie_lamp))
    assert "belongs to another owner" in found["device"][0]


def test_a_group_holding_another_owners_device_is_refused(alice_owner, alice_lamp, charlie_lamp):
    group = DeviceGroup.objects.create(owner=alice_owner, name="mixed")
    group.devices.set([alice_lamp, charlie_lamp])
    assert "belongs to another owner" in " ".join(
        errors(schedule(alice_owner, group=group))["group"]
    )


def test_meters_cannot_be_scheduled_and_relays_must_exist(alice_meter, alice_relay):
    assert "has no switch" in errors(schedule(alice_meter.owner, device=alice_meter))["device"][0]
    found = errors(schedule(alice_relay.owner, device=alice_relay, relay=3))
    assert "has 2 relay(s)" in found["relay"][0]


def test_more_than_the_limit_per_device_is_refused(alice_owner, alice_lamp, settings):
    settings.SCHEDULE_MAX_PER_DEVICE = 2
    actions.save_schedule(schedule(alice_owner, device=alice_lamp, name="a"))
    group = DeviceGroup.objects.create(owner=alice_owner, name="all")
    group.devices.set([alice_lamp])
    actions.save_schedule(schedule(alice_owner, group=group, name="b"))  # counts too
    found = errors(schedule(alice_owner, device=alice_lamp, name="c"))
    assert "already has 2 schedules (at most 2 per device)" in found["device"][0]
    # Editing one of the two is not "one more".
    existing = Schedule.objects.get(name="a")
    existing.cron = "0 7 * * *"
    actions.save_schedule(existing)


def test_next_run_at_is_stored_in_utc_from_the_zones_rules(alice_lamp):
    s = schedule(alice_lamp.owner, device=alice_lamp, cron="30 18 * * *", timezone="Europe/Berlin")
    actions.save_schedule(s, now=datetime(2026, 7, 1, 12, tzinfo=UTC))
    assert s.next_run_at == datetime(2026, 7, 1, 16, 30, tzinfo=UTC)  # 18:30 CEST
    actions.save_schedule(s, now=datetime(2026, 12, 1, 12, tzinfo=UTC))
    assert s.next_run_at == datetime(2026, 12, 1, 17, 30, tzinfo=UTC)  # 18:30 CET


def test_the_expression_is_stored_normalized(alice_lamp):
    s = schedule(alice_lamp.owner, device=alice_lamp, cron="  30   18 *  * 1-5 ")
    actions.save_schedule(s)
    assert s.cron == "30 18 * * 1-5"


def test_a_disabled_or_ended_schedule_has_no_next_run(alice_lamp):
    s = schedule(alice_lamp.owner, device=alice_lamp, enabled=False)
    actions.save_schedule(s)
    assert s.next_run_at is None
    ended = schedule(alice_lamp.owner, device=alice_lamp, name="x", ends_on=date(2026, 1, 1))
    actions.save_schedule(ended, now=datetime(2026, 2, 1, tzinfo=UTC))
    assert ended.next_run_at is None


def test_a_viewer_cannot_save_and_charlie_cannot_touch_alices_schedules(alice_lamp, bob, charlie):
    s = schedule(alice_lamp.owner, device=alice_lamp)
    for user in (bob, charlie):
        with pytest.raises(actions.NotAllowed):
            actions.save_schedule(s, user=user)
    actions.save_schedule(s)
    for user in (bob, charlie):
        with pytest.raises(actions.NotAllowed):
            actions.set_enabled(s, False, user=user)
    assert Schedule.objects.get(pk=s.pk).enabled


def test_devices_removed_from_the_platform_take_their_schedules_along(alice_lamp):
    s = schedule(alice_lamp.owner, device=alice_lamp)
    actions.save_schedule(s)
    Device.objects.filter(pk=alice_lamp.pk).delete()
    assert not Schedule.objects.exists()
