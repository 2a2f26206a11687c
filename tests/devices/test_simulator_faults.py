"""Fault injection: duplicates, sequence gaps and malformed payloads, on purpose and counted."""

from __future__ import annotations

import json
import random

import pytest

from apps.devices.simulator.esp32_lamp import Esp32Lamp
from apps.devices.simulator.faults import BAD_PAYLOADS, FaultInjector
from apps.devices.simulator.meter_v2 import MeterV2
from tests.devices.simkit import FakeHost, make


def test_without_rates_reports_pass_through_untouched():
    host = FakeHost()
    meter = make(MeterV2, host)
    faults = FaultInjector()
    assert [json.loads(m.payload)["seq"] for m in faults.report(meter)] == [1]
    assert not faults.counts


def test_a_duplicate_is_the_very_same_bytes():
    host = FakeHost()
    meter = make(MeterV2, host)
    faults = FaultInjector(duplicate_rate=1.0, rng=random.Random(1))
    first, again = faults.report(meter)
    assert first == again
    assert faults.counts["duplicates"] == 1


def test_a_gap_skips_sequence_numbers_for_meters_only():
    host = FakeHost()
    meter = make(MeterV2, host)
    faults = FaultInjector(gap_rate=1.0, rng=random.Random(1))
    seqs = [json.loads(faults.report(meter)[0].payload)["seq"] for _ in range(5)]
    assert all(b - a >= 2 for a, b in zip(seqs, seqs[1:], strict=False))
    assert faults.counts["gaps"] == 5
    lamp = make(Esp32Lamp, host)
    faults.report(lamp)  # a lamp has no sequence: nothing to skip, nothing counted
    assert faults.counts["gaps"] == 5


def test_bad_payloads_keep_the_topic_and_cover_every_malformation():
    host = FakeHost()
    lamp = make(Esp32Lamp, host, device_id="lamp-9")
    faults = FaultInjector(bad_rate=1.0, rng=random.Random(3))
    kinds = set()
    for _ in range(200):
        (message,) = faults.report(lamp)
        assert message.topic == "home/lamp-9/status"
        assert message.payload in {p for _, p in BAD_PAYLOADS}
        kinds.add(message.kind)
    assert kinds == {f"bad_{k}" for k, _ in BAD_PAYLOADS}
    assert faults.counts["bad"] == 200


def test_every_bad_payload_really_is_unacceptable():
    def acceptable(payload: bytes) -> bool:
        if len(payload) > 64 * 1024:
            return False
        try:
            # Strict JSON (no NaN), an object, with the envelope's types where present.
            data = json.loads(
                payload, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))
            )
        except ValueError:
            return False
        return isinstance(data, dict) and isinstance(data.get("seq", 0), int)

    assert not any(acceptable(payload) for _, payload in BAD_PAYLOADS)


@pytest.mark.parametrize("field", ["duplicate_rate", "gap_rate", "bad_rate"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_rates_outside_zero_to_one_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        FaultInjector(**{field: value})
