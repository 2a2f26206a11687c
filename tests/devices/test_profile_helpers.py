"""The helpers every message goes through before the database: routing, device times, readings."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from apps.devices import profiles
from apps.devices.profiles import Reject, route
from apps.devices.profiles.base import BAD_ID, FOREIGN_TOPIC, INVALID, device_time
from apps.devices.profiles.meter_v2 import _reading


def test_routing_is_remembered_per_topic_and_refusals_are_not(monkeypatch):
    monkeypatch.setattr(profiles, "_routed", {})
    profile, key, channel = route("iot/m-1/telemetry")
    assert (profile.name, key, channel) == ("meter-v2", "m-1", "telemetry")
    assert route("iot/m-1/telemetry") is route("iot/m-1/telemetry")
    for topic, reason in [("iot/m 1/telemetry", BAD_ID), ("elsewhere/x", FOREIGN_TOPIC)]:
        for _ in range(2):
            with pytest.raises(Reject) as refused:
                route(topic)
            assert refused.value.reason == reason
    assert list(profiles._routed) == ["iot/m-1/telemetry"]


def test_routing_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(profiles, "_routed", {})
    monkeypatch.setattr(profiles, "ROUTED_KEPT", 3)
    for n in range(7):
        route(f"iot/m-{n}/telemetry")
        assert len(profiles._routed) <= 3
    assert route("iot/m-6/telemetry")[1] == "m-6"


def test_device_times_in_every_accepted_form_and_the_implausible_ones_refused():
    at = datetime(2026, 11, 23, 2, 25, 0, 123000, tzinfo=UTC)
    assert device_time("2026-11-23T02:25:00.123Z") == at
    assert device_time("2026-11-23T03:25:00.123+01:00") == at
    assert device_time(at.timestamp()) == at
    assert device_time(int(at.timestamp() * 1000)) == at
    soon = datetime.now(UTC) + timedelta(hours=23)
    assert device_time(soon.isoformat()) == soon

    for value in [
        "2026-11-23T02:25:00",  # no zone: a local time of an unknown zone
        "1970-01-01T00:00:05Z",  # a device without NTP
        5,
        (datetime.now(UTC) + timedelta(days=2)).isoformat(),
        "not a time",
        "2026-11-23T02:25:00.123456789012345678901234567Z",  # over 40 characters
        True,
        None,
        math.nan,
        math.inf,
        1e300,
        {"ts": 1},
    ]:
        assert device_time(value) is None, value


def test_readings_are_finite_numbers_flattened_one_level():
    assert _reading({"voltage": 750.5, "count": 3, "off": None, "L1": {"a": 1.5, "b": None}}) == {
        "voltage": 750.5,
        "count": 3.0,
        "L1.a": 1.5,
    }
    for bad in [{"v": math.inf}, {"v": -math.inf}, {"v": math.nan}, {"v": True}, {"v": "1"}]:
        with pytest.raises(Reject) as refused:
            _reading(bad)
        assert refused.value.reason == INVALID
