"""ingest_batch: telemetry, state, transitions, sequence tracking and quarantine, no broker."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pytest
from django.db.models.query_utils import DeferredAttribute

from apps.devices.ingest import (
    LOAD_FIELDS,
    DeviceDirectory,
    InboundMessage,
    ingest_batch,
    mark_silent_devices_offline,
)
from apps.devices.models import (
    Connection,
    Device,
    QuarantinedMessage,
    Telemetry,
    Transition,
    TransitionKind,
)

pytestmark = pytest.mark.django_db


def msg(topic: str, payload, *, at: datetime | None = None, retained: bool = False):
    if isinstance(payload, dict | list):
        payload = json.dumps(payload).encode()
    elif isinstance(payload, str):
        payload = payload.encode()
    return InboundMessage(topic, payload, at or datetime.now(UTC), retained=retained)


def ingest(*messages):
    return ingest_batch(list(messages), directory=DeviceDirectory())


def envelope(msg_type: str, seq: int, **extra):
    return {"v": 2, "seq": seq, "msg_type": msg_type, "ts": "2026-11-22T10:00:00Z", **extra}


def reading(seq: int, voltage: float = 750.0, **extra):
    return envelope(
        "telemetry",
        seq,
        device_type="power_meter_dc",
        data={"voltage": voltage, "current": 120.5, "power": voltage * 120.5, "energy": 1234.5},
        **extra,
    )


def test_esp32_status_stores_telemetry_and_records_power_and_connection(alice_lamp):
    result = ingest(
        msg(
            "home/alice-lamp-1/status",
            {
                "deviceId": "alice-lamp-1",
                "power": "ON",
                "rssi": -61,
                "fw": "1.4.2",
                "ip": "10.0.0.7",
            },
        )
    )
    assert result.stored == 1 and result.quarantined == 0
    lamp = Device.objects.get(pk=alice_lamp.pk)
    assert lamp.connection == Connection.ONLINE
    assert lamp.power == {"1": "ON"}
    assert (lamp.firmware, lamp.rssi, lamp.ip_address) == ("1.4.2", -61, "10.0.0.7")
    kinds = sorted(Transition.objects.filter(device=lamp).values_list("kind", "new"))
    assert kinds == [("connection", "online"), ("power", "ON")]
    assert {e.type for e in result.events} == {"status", "connection", "power"}
    status = next(e for e in result.events if e.type == "status")
    assert status.data["power"] == {"1": "ON"} and status.owner_id == alice_lamp.owner_id


def test_same_state_again_records_no_transition(alice_lamp):
    body = {"deviceId": "alice-lamp-1", "power": "OFF"}
    ingest(msg("home/alice-lamp-1/status", body))
    before = Transition.objects.count()
    ingest(msg("home/alice-lamp-1/status", body))
    assert Transition.objects.count() == before
    assert Telemetry.objects.filter(device=alice_lamp).count() == 2


def test_lwt_offline_then_message_brings_device_back(alice_lamp):
    ingest(msg("home/alice-lamp-1/lwt", "ONLINE"))
    ingest(msg("home/alice-lamp-1/lwt", "OFFLINE"))
    assert Device.objects.get(pk=alice_lamp.pk).connection == Connection.OFFLINE
    ingest(msg("home/alice-lamp-1/status", {"power": "ON"}))
    changes = list(
        Transition.objects.filter(device=alice_lamp, kind="connection")
        .order_by("id")
        .values_list("new", "cause")
    )
    assert changes == [("online", "lwt"), ("offline", "lwt"), ("online", "status")]


def test_retained_online_does_not_undo_an_inactivity_timeout(alice_lamp):
    Device.objects.filter(pk=alice_lamp.pk).update(connection=Connection.OFFLINE)
    ingest(msg("home/alice-lamp-1/lwt", "ONLINE", retained=True))
    assert Device.objects.get(pk=alice_lamp.pk).connection == Connection.OFFLINE


def test_retained_state_rebuilds_an_unknown_device(alice_lamp):
    ingest(msg("home/alice-lamp-1/lwt", "ONLINE", retained=True))
    assert Device.objects.get(pk=alice_lamp.pk).connection == Connection.ONLINE


@pytest.mark.parametrize("prefix_first", [True, False])
def test_tasmota_power_result_state_and_sensor_in_both_topic_orders(alice_relay, prefix_first):
    def t(prefix: str, command: str) -> str:
        return (
            f"{prefix}/tasmota_A1B2C3/{command}"
            if prefix_first
            else f"tasmota_A1B2C3/{prefix}/{command}"
        )

    result = ingest(
        msg(t("tele", "LWT"), "Online"),
        msg(t("stat", "POWER1"), "ON"),
        msg(t("stat", "RESULT"), {"POWER2": "ON"}),
        msg(
            t("tele", "STATE"),
            {
                "Time": "2026-11-22T11:00:00",
                "Uptime": "0T01:00:00",
                "POWER1": "OFF",
                "POWER2": "ON",
                "Wifi": {"AP": 1, "SSId": "home", "RSSI": 78, "Signal": -61},
            },
        ),
        msg(
            t("tele", "SENSOR"),
            {
                "Time": "2026-11-22T11:00:00",
                "ENERGY": {
                    "Total": 12.3,
                    "Power": 45,
                    "Voltage": 231,
                    "Current": 0.2,
                    "Factor": 0.97,
                },
            },
        ),
    )
    assert result.quarantined == 0 and result.stored == 4
    relay = Device.objects.get(pk=alice_relay.pk)
    assert relay.power == {"1": "OFF", "2": "ON"}
    assert relay.connection == Connection.ONLINE and relay.rssi == -61
    assert relay.last_reading["power"] == 45.0 and relay.last_reading["voltage"] == 231.0
    assert relay.topic_order == ("prefix" if prefix_first else "topic")
    power = list(
        Transition.objects.filter(device=relay, kind="power")
        .order_by("id")
        .values_list("relay", "new")
    )
    assert power == [(1, "ON"), (2, "ON"), (1, "OFF")]


def test_tasmota_topics_outside_the_contract_are_a_sign_of_life_not_an_error(alice_relay):
    result = ingest(msg("stat/tasmota_A1B2C3/STATUS11", {"StatusSTS": {}}))
    assert result.quarantined == 0 and result.stored == 0 and result.ignored == 1
    assert Device.objects.get(pk=alice_relay.pk).last_seen_at is not None


def test_meter_sequence_duplicates_stored_once_and_gaps_counted(alice_meter):
    topic = "iot/alice-meter-1/telemetry"
    result = ingest(
        msg(
            "iot/alice-meter-1/hello",
            envelope("hello", 0, boot_id="b1", fw_version="2.1.0", device_type="power_meter_dc"),
        ),
        msg(topic, reading(1)),
        msg(topic, reading(2)),
        msg(topic, reading(2)),  # duplicate
        msg(topic, reading(1)),  # older: duplicate
        msg(topic, reading(5)),  # gap of 2
    )
    assert result.duplicates == 2
    meter = Device.objects.get(pk=alice_meter.pk)
    assert Telemetry.objects.filter(device=meter, kind="telemetry").count() == 3
    assert (
        meter.boot_id,
        meter.last_seq,
        meter.seq_gaps,
        meter.seq_missing,
        meter.seq_duplicates,
    ) == ("b1", 5, 1, 2, 2)
    assert meter.firmware == "2.1.0" and meter.device_type == "power_meter_dc"
    # The same duplicate in a later batch is still recognised (state lives in the database).
    assert ingest(msg(topic, reading(5))).duplicates == 1


def test_meter_new_boot_restarts_the_sequence(alice_meter):
    topic = "iot/alice-meter-1/telemetry"
    ingest(
        msg("iot/alice-meter-1/hello", envelope("hello", 0, boot_id="b1")),
        msg(topic, reading(1)),
        msg(topic, reading(2)),
    )
    result = ingest(
        msg("iot/alice-meter-1/hello", envelope("hello", 0, boot_id="b2")), msg(topic, reading(1))
    )
    assert result.duplicates == 0 and result.stored == 2
    meter = Device.objects.get(pk=alice_meter.pk)
    assert (meter.boot_id, meter.last_seq, meter.seq_gaps) == ("b2", 1, 0)


def test_meter_status_ack_and_ota(alice_meter):
    result = ingest(
        msg("iot/alice-meter-1/status", {"status": "online"}),
        msg(
            "iot/alice-meter-1/command/ack",
            envelope("command_ack", 3, command_id="c-1", status="ok"),
        ),
        msg(
            "iot/alice-meter-1/ota/status", envelope("ota_status", 4, state="done", version="2.2.0")
        ),
        msg("iot/alice-meter-1/status", "offline"),
    )
    assert result.quarantined == 0
    meter = Device.objects.get(pk=alice_meter.pk)
    assert meter.connection == Connection.OFFLINE and meter.firmware == "2.2.0"
    ack = next(e for e in result.events if e.type == "command_ack")
    assert ack.data == {"command_id": "c-1", "status": "ok"}  # without the envelope
    assert ack.seq == 3


def test_meter_events_carry_readings_at_the_top_and_the_raw_message_is_kept(alice_meter):
    result = ingest(msg("iot/alice-meter-1/telemetry", reading(7, voltage=751.5)))
    [event] = [e for e in result.events if e.type == "telemetry"]
    assert event.data["voltage"] == 751.5 and event.data["device_type"] == "power_meter_dc"
    assert "v" not in event.data and "data" not in event.data and event.seq == 7
    row = Telemetry.objects.get(device=alice_meter)
    assert row.data["v"] == 2 and row.data["data"]["voltage"] == 751.5


BAD_CORPUS = [
    ("home/alice-lamp-1/status", os.urandom(64) + b"\xff", "malformed"),
    ("home/alice-lamp-1/status", b'{"deviceId": "alice-lamp-1", "power": "ON"', "malformed"),
    ("home/alice-lamp-1/status", b'{"power": NaN}', "malformed"),
    ("home/alice-lamp-1/status", b"[1, 2, 3]", "invalid"),
    ("home/alice-lamp-1/status", b'{"power": "MAYBE"}', "invalid"),
    ("home/alice-lamp-1/status", b'{"deviceId": "someone-else", "power": "ON"}', "invalid"),
    ("home/alice-lamp-1/status", b'{"power": "ON", "requestId": {"x": 1}}', "invalid"),
    ("home/alice-lamp-1/lwt", b"MAYBE", "invalid"),
    (
        "home/alice-lamp-1/status",
        b'{"power": "ON", "pad": "' + b"x" * (1024 * 1024) + b'"}',
        "oversize",
    ),
    ("home/a+b/status", b'{"power": "ON"}', "bad_id"),
    ("home/a#/status", b'{"power": "ON"}', "bad_id"),
    ("home/UPPER/status", b'{"power": "ON"}', "unknown_device"),
    ("home/no-such-lamp/status", b'{"power": "ON"}', "unknown_device"),
    ("home/alice-lamp-1/unexpected", b"{}", "foreign_topic"),
    ("stat/tasmota_A1B2C3/power 1", b"ON", "foreign_topic"),
    ("iot/alice-meter-1/telemetry", b'{"v": 1, "seq": 1, "data": {}}', "invalid"),
    ("iot/alice-meter-1/telemetry", b'{"v": 2, "seq": "one", "data": {}}', "invalid"),
    ("iot/alice-meter-1/telemetry", b'{"v": 2, "seq": 1, "data": {"voltage": "high"}}', "invalid"),
    ("iot/alice-meter-1/telemetry", b'{"v": 2, "seq": 1, "data": {"voltage": true}}', "invalid"),
    ("iot/alice-meter-1/telemetry", b'{"v": 2, "seq": 1, "data": [1]}', "invalid"),
    (
        "iot/alice-meter-1/telemetry",
        b'{"v": 2, "seq": 1, "msg_type": "hello", "data": {}}',
        "invalid",
    ),
    ("iot/alice-meter-1/hello", b'{"v": 2, "seq": 0}', "invalid"),
    ("iot/alice-meter-1/command/ack", b'{"v": 2, "seq": 2, "status": "ok"}', "invalid"),
    ("iot/alice-meter-1/status", b'"sleeping"', "invalid"),
    ("stat/tasmota_A1B2C3/RESULT", b'{"POWER1": 7}', "invalid"),
    ("tele/tasmota_A1B2C3/SENSOR", b"", "malformed"),
]


def test_bad_inputs_are_quarantined_with_reasons_while_good_messages_flow(
    alice_lamp, alice_meter, alice_relay
):
    good = [
        msg("home/alice-lamp-1/status", {"power": "ON"}),
        msg("iot/alice-meter-1/telemetry", reading(1)),
    ]
    bad = [msg(topic, payload) for topic, payload, _ in BAD_CORPUS]
    result = ingest(good[0], *bad, good[1])

    assert result.stored == 2
    assert result.quarantined == len(BAD_CORPUS)
    rows = list(QuarantinedMessage.objects.order_by("id"))
    assert sorted((r.topic, r.reason) for r in rows) == sorted(
        (t, reason) for t, _, reason in BAD_CORPUS
    )
    assert all(r.detail for r in rows)
    oversize = next(r for r in rows if r.reason == "oversize")
    assert oversize.size > 1024 * 1024 and len(oversize.payload) == QuarantinedMessage.PAYLOAD_KEPT
    # Refusals about a known device are shown to its owner; the others only to operators.
    lamp_rows = [r for r in rows if r.topic == "home/alice-lamp-1/status"]
    assert lamp_rows and all(r.owner_id == alice_lamp.owner_id for r in lamp_rows)
    assert all(r.owner_id is None for r in rows if r.reason in ("unknown_device", "bad_id"))


def test_messages_of_two_owners_in_one_batch_stay_apart(alice_lamp, charlie_lamp):
    result = ingest(
        msg("home/alice-lamp-1/status", {"power": "ON"}),
        msg("home/charlie-lamp-1/status", {"power": "OFF"}),
    )
    owners = {e.device_id: e.owner_id for e in result.events}
    assert owners == {"alice-lamp-1": alice_lamp.owner_id, "charlie-lamp-1": charlie_lamp.owner_id}
    assert Telemetry.objects.get(device=charlie_lamp).owner_id == charlie_lamp.owner_id


def test_a_device_deleted_after_caching_is_quarantined_not_crashing(alice_lamp):
    directory = DeviceDirectory()
    ingest_batch([msg("home/alice-lamp-1/status", {"power": "ON"})], directory=directory)
    Device.objects.filter(pk=alice_lamp.pk).delete()
    result = ingest_batch([msg("home/alice-lamp-1/status", {"power": "OFF"})], directory=directory)
    assert result.quarantined == 1 and result.stored == 0
    assert QuarantinedMessage.objects.get().reason == "unknown_device"


def test_a_device_replaced_under_the_same_topic_gets_its_messages_at_once(alice_lamp):
    # Deleted and created again (a replaced unit): the cached key still names the old row.
    directory = DeviceDirectory()
    ingest_batch([msg("home/alice-lamp-1/status", {"power": "ON"})], directory=directory)
    owner, profile = alice_lamp.owner, alice_lamp.profile
    alice_lamp.delete()
    replacement = Device.objects.create(
        owner=owner, device_id="alice-lamp-1", name="New lamp", profile=profile
    )
    result = ingest_batch([msg("home/alice-lamp-1/status", {"power": "OFF"})], directory=directory)
    assert (result.stored, result.quarantined) == (1, 0)
    assert Telemetry.objects.get().device_id == replacement.pk
    assert [e.device_pk for e in result.events] == [replacement.pk] * len(result.events)
    assert not QuarantinedMessage.objects.exists()


def test_deleting_a_device_or_an_owner_deletes_its_telemetry(alice_lamp, alice_meter):
    # Telemetry has no database-level foreign keys (the ingest hot path): the cascade is
    # Django's, and nothing of a deleted device may stay behind.
    ingest(
        msg("home/alice-lamp-1/status", {"power": "ON"}),
        msg("iot/alice-meter-1/telemetry", reading(1)),
    )
    assert Telemetry.objects.filter(device=alice_lamp).count() == 1
    Device.objects.filter(pk=alice_lamp.pk).delete()
    assert not Telemetry.objects.filter(device_id=alice_lamp.pk).exists()
    assert Telemetry.objects.filter(device=alice_meter).count() == 1
    alice_meter.owner.delete()
    assert not Telemetry.objects.exists()


def test_inactivity_timeout_marks_silent_devices_offline_once(alice_lamp, alice_meter):
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    ingest(
        msg("home/alice-lamp-1/status", {"power": "ON"}, at=long_ago),
        msg("iot/alice-meter-1/telemetry", reading(1)),
    )
    swept = mark_silent_devices_offline()
    assert [d.pk for d in swept.changed_devices] == [alice_lamp.pk]
    assert [(e.type, e.data["new"]) for e in swept.events] == [("connection", "offline")]
    assert not mark_silent_devices_offline().changed_devices  # a second sweeper: nothing to do
    assert Device.objects.get(pk=alice_lamp.pk).connection == Connection.OFFLINE
    assert Device.objects.get(pk=alice_meter.pk).connection == Connection.ONLINE
    timeout = Transition.objects.get(device=alice_lamp, new="offline")
    assert timeout.cause == "timeout"


def test_liveness_alone_is_written_at_most_every_few_seconds(alice_lamp):
    t0 = datetime.now(UTC)
    ingest(msg("home/alice-lamp-1/status", {"power": "ON"}, at=t0))
    ingest(msg("home/alice-lamp-1/status", {"power": "ON"}, at=t0 + timedelta(seconds=1)))
    assert Device.objects.get(pk=alice_lamp.pk).last_seen_at == t0
    ingest(msg("home/alice-lamp-1/status", {"power": "ON"}, at=t0 + timedelta(seconds=6)))
    assert Device.objects.get(pk=alice_lamp.pk).last_seen_at == t0 + timedelta(seconds=6)


@pytest.mark.django_db(transaction=True)
def test_a_device_written_elsewhere_between_batches_is_read_again(alice_meter):
    # Each batch is its own transaction, as in the listener, and one directory (one listener
    # process) serves them all: its cached devices must not hide another process's write.
    directory = DeviceDirectory()
    topic = "iot/alice-meter-1/telemetry"
    ingest_batch([msg(topic, reading(1))], directory=directory)  # online: the row is written
    ingest_batch([msg(topic, reading(2))], directory=directory)  # liveness only: not written

    # The inactivity sweep (another process) marks it offline meanwhile.
    Device.objects.filter(pk=alice_meter.pk).update(connection=Connection.OFFLINE)
    ingest_batch([msg(topic, reading(3))], directory=directory)

    assert Device.objects.get(pk=alice_meter.pk).connection == Connection.ONLINE
    back_online = Transition.objects.filter(
        device=alice_meter, kind=TransitionKind.CONNECTION
    ).order_by("id")
    assert [(t.old, t.new) for t in back_online] == [("unknown", "online"), ("offline", "online")]


def test_state_fields_are_plain_attributes_that_a_batch_may_load_in_one_update():
    # DeviceDirectory.load writes a batch's fresh state into the cached instances' __dict__:
    # right only while each field is Django's plain descriptor, under its own name.
    for name in LOAD_FIELDS:
        assert Device._meta.get_field(name).attname == name
        assert type(Device.__dict__[name]) is DeferredAttribute, name
