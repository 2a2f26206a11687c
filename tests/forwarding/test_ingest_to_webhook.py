"""End to end through the listener's batch function: an accepted reading becomes a delivery in
the same transaction, and reaches the owner's receiver signed, in the standard envelope."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import orjson
import pytest

from apps.devices.ingest import DeviceDirectory, InboundMessage, ingest_batch
from apps.devices.models import QuarantinedMessage, Telemetry
from apps.forwarding import actions, outbox
from apps.forwarding.models import Delivery

from .conftest import deliver_due, make_webhook
from .receiver import signed_by


def reading(device_id: str, seq: int, voltage: float) -> InboundMessage:
    body = {
        "v": 2,
        "seq": seq,
        "msg_type": "telemetry",
        "ts": datetime.now(UTC).isoformat(),
        "device_type": "power_meter_dc",
        "data": {"voltage": voltage, "current": 12.5, "power": 9375.0, "energy": 1.5},
    }
    return InboundMessage(
        f"iot/{device_id}/telemetry", json.dumps(body).encode(), datetime.now(UTC), qos=1
    )


def test_a_reading_goes_from_ingest_to_the_receiver(receiver, alice_owner, alice_meter) -> None:
    hook = make_webhook(alice_owner, receiver.url(), event_types=["telemetry"])
    result = ingest_batch([reading(alice_meter.device_id, 1, 750.5)])
    assert result.stored == 1
    telemetry = Telemetry.objects.get(device=alice_meter)
    delivery = Delivery.objects.get(destination=hook)
    assert delivery.event_id == f"tel_{telemetry.pk}"
    deliver_due()
    [request] = receiver.requests
    assert signed_by(request, hook.secret.reveal())
    body = orjson.loads(request.body)
    assert body["type"] == "telemetry"
    assert body["data"]["device"]["id"] == alice_meter.device_id
    # A meter's event carries its readings at the top of `data`, without the envelope.
    assert body["data"]["data"]["voltage"] == 750.5
    assert "v" not in body["data"]["data"] and body["data"]["seq"] == 1
    assert body["timestamp"] == body["data"]["ts"]


@pytest.mark.django_db(transaction=True)
def test_a_destination_deleted_under_the_listener_does_not_cost_readings(
    receiver, alice_owner, alice_meter
) -> None:
    # The listener's route cache still holds the destination for a few seconds after it is
    # deleted elsewhere. Its batch commits (the outbox has no database-level keys to refuse the
    # rows), the readings are stored, not quarantined, and the sweep removes the stray rows.
    doomed = make_webhook(alice_owner, receiver.url(), event_types=["telemetry"])
    outbox.routes_for({alice_owner.pk})
    doomed.delete()
    messages = [reading(alice_meter.device_id, n, 750.0 + n) for n in (1, 2)]
    result = ingest_batch(messages, directory=DeviceDirectory())
    assert (result.stored, result.quarantined) == (2, 0)
    assert Telemetry.objects.filter(device=alice_meter).count() == 2
    assert not QuarantinedMessage.objects.exists()
    assert actions.remove_orphans() == 2
    assert not Delivery.objects.exists()
