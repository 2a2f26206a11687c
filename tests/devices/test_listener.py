"""The listener against a real broker: Mosquitto in CI, the embedded broker otherwise."""

from __future__ import annotations

import gc
import io
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from django.core.management import call_command
from django.db import connection
from django.test import override_settings
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from apps.devices import mqtt as mqtt_module
from apps.devices.ingest import InboundMessage
from apps.devices.listener import Inbox, Listener
from apps.devices.models import Connection, Device, Profile, QuarantinedMessage, Telemetry
from apps.devices.mqtt import BatchingClient, take_publishes
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def publisher(broker) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.fixture
def running_listener(mqtt_broker, transactional_db):
    with override_settings(MQTT_PROTOCOL=mqtt_broker.protocol):
        listener = Listener(
            url=mqtt_broker.url,
            group="",
            client_id=f"test-listener-{uuid.uuid4().hex[:8]}",
            batch_ms=20,
            sweep_every=3600,
        )
        thread = threading.Thread(target=listener.run, daemon=True)
        thread.start()
        assert listener.wait_connected(10)
        time.sleep(0.3)  # subscriptions granted
        yield listener
        listener.stop()
        thread.join(20)


def test_a_lost_database_connection_fails_the_batch_and_the_listener_retries_it(
    running_listener, alice_owner, mqtt_broker
):
    # The hot statements run on psycopg cursors of their own; their errors must reach the
    # listener as Django's, or its retry never sees them and the writer thread dies.
    if connection.vendor != "postgresql":
        pytest.skip("terminates the listener's PostgreSQL backend")
    uid = uuid.uuid4().hex[:6]
    meter = Device.objects.create(owner=alice_owner, device_id=f"m-{uid}", profile=Profile.METER_V2)
    stored = Telemetry.objects.filter(device=meter)
    pub = publisher(mqtt_broker)
    try:

        def send(seq: int) -> None:
            body = {"v": 2, "seq": seq, "msg_type": "telemetry", "data": {"power": 1.0}}
            info = pub.publish(f"iot/{meter.device_id}/telemetry", json.dumps(body), qos=1)
            info.wait_for_publish(10)

        send(1)
        wait_for(lambda: stored.count() == 1)
        # What a database restart does to the listener's session. The device is cached, so the
        # next batch's first statement is one of the listener's own cursors.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        send(2)
        wait_for(lambda: stored.count() == 2)
        assert running_listener.stats.failed_batches >= 1
        assert sorted(stored.values_list("seq", flat=True)) == [1, 2]
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_it_ingests_every_profile_and_quarantines_bad_input_without_stopping(
    running_listener, alice_owner, mqtt_broker
):
    uid = uuid.uuid4().hex[:6]
    lamp = Device.objects.create(
        owner=alice_owner, device_id=f"lamp-{uid}", profile=Profile.ESP32_LAMP
    )
    relay = Device.objects.create(
        owner=alice_owner,
        device_id=f"relay-{uid}",
        topic=f"tasmota_{uid}",
        profile=Profile.TASMOTA,
        relay_count=2,
    )
    meter = Device.objects.create(
        owner=alice_owner, device_id=f"meter-{uid}", profile=Profile.METER_V2
    )
    pub = publisher(mqtt_broker)
    pub.publish(
        f"home/{lamp.device_id}/status", json.dumps({"power": "OFF"}), qos=1
    ).wait_for_publish()
    pub.publish(f"home/{lamp.device_id}/status", b"\x00\xff{not json", qos=1).wait_for_publish()
    pub.publish(f"home/ghost-{uid}/status", json.dumps({"power": "ON"}), qos=1).wait_for_publish()
    pub.publish(f"home/{lamp.device_id}/status", b"x" * (70 * 1024), qos=1).wait_for_publish()
    pub.publish(f"{relay.topic}/stat/POWER2", "ON", qos=1).wait_for_publish()
    pub.publish(
        f"iot/{meter.device_id}/telemetry",
        json.dumps(
            {
                "v": 2,
                "seq": 1,
                "msg_type": "telemetry",
                "ts": 1795000000000,
                "data": {"voltage": 751.2, "current": 10.0},
            }
        ),
        qos=1,
    ).wait_for_publish()
    pub.publish(
        f"home/{lamp.device_id}/status", json.dumps({"power": "ON"}), qos=1
    ).wait_for_publish()

    wait_for(lambda: Device.objects.get(pk=lamp.pk).power == {"1": "ON"})
    ours = QuarantinedMessage.objects.filter(topic__contains=uid)  # the broker may be shared
    wait_for(lambda: ours.count() == 3)
    assert Device.objects.get(pk=relay.pk).power == {"2": "ON"}
    assert Device.objects.get(pk=relay.pk).topic_order == "topic"
    assert Device.objects.get(pk=meter.pk).last_reading["voltage"] == 751.2
    assert sorted(ours.values_list("reason", flat=True)) == [
        "malformed",
        "oversize",
        "unknown_device",
    ]
    assert Telemetry.objects.filter(device__owner=alice_owner).count() == 4
    pub.loop_stop()
    pub.disconnect()


def test_retained_connection_state_is_rebuilt_after_a_restart(
    mqtt_broker, transactional_db, alice_owner
):
    uid = uuid.uuid4().hex[:6]
    lamp = Device.objects.create(
        owner=alice_owner, device_id=f"lamp-{uid}", profile=Profile.ESP32_LAMP
    )
    pub = publisher(mqtt_broker)
    pub.publish(f"home/{lamp.device_id}/lwt", "ONLINE", qos=1, retain=True).wait_for_publish()
    try:
        with override_settings(MQTT_PROTOCOL=mqtt_broker.protocol):
            listener = Listener(
                url=mqtt_broker.url, group="", client_id=f"fresh-{uid}", sweep_every=3600
            )
            thread = threading.Thread(target=listener.run, daemon=True)
            thread.start()
            wait_for(lambda: Device.objects.get(pk=lamp.pk).connection == Connection.ONLINE)
            listener.stop()
            thread.join(20)
    finally:
        pub.publish(f"home/{lamp.device_id}/lwt", b"", qos=1, retain=True).wait_for_publish()
        pub.loop_stop()
        pub.disconnect()


def start_listener_process(broker, client_id: str, group: str = "") -> subprocess.Popen:
    env = subprocess_env(
        MQTT_URL=broker.url, MQTT_PROTOCOL=broker.protocol, MQTT_SHARED_GROUP=group
    )
    env["LOG_LEVEL"] = "INFO"
    return subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "mqtt_listen",
            "--client-id",
            client_id,
            "--no-live",
            "--batch-ms",
            "20",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_sigkill_during_a_qos1_burst_loses_nothing_acknowledged(
    private_mosquitto, transactional_db, alice_owner
):
    mqtt_broker = private_mosquitto
    uid = uuid.uuid4().hex[:6]
    meter = Device.objects.create(
        owner=alice_owner, device_id=f"meter-{uid}", profile=Profile.METER_V2
    )
    client_id = f"kill-test-{uid}"
    total = 4000

    proc = start_listener_process(mqtt_broker, client_id)
    try:
        wait_for(lambda: _listener_subscribed(mqtt_broker, meter.device_id), timeout=30)
        pub = publisher(mqtt_broker)
        published = threading.Event()

        def burst() -> None:
            for seq in range(1, total + 1):
                body = {
                    "v": 2,
                    "seq": seq,
                    "msg_type": "telemetry",
                    "ts": 1795000000000 + seq,
                    "data": {"voltage": 750.0, "power": float(seq)},
                }
                info = pub.publish(f"iot/{meter.device_id}/telemetry", json.dumps(body), qos=1)
                if seq % 100 == 0:
                    info.wait_for_publish(10)
                    time.sleep(0.1)  # a steady ~1,000 messages/s, so the kill lands mid-stream
            info.wait_for_publish(10)
            published.set()

        sender = threading.Thread(target=burst, daemon=True)
        sender.start()
        wait_for(lambda: Telemetry.objects.filter(device=meter).count() > total // 4, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert not published.is_set(), "the kill must land while messages are still published"
        proc = start_listener_process(mqtt_broker, client_id)
        assert published.wait(120)
        try:
            wait_for(lambda: Telemetry.objects.filter(device=meter).count() >= total, timeout=60)
        except AssertionError:
            count = Telemetry.objects.filter(device=meter).count()
            proc.send_signal(signal.SIGTERM)
            err = proc.communicate(timeout=20)[1].decode()[-3000:]
            raise AssertionError(f"{count} of {total} stored; listener said:\n{err}") from None
        time.sleep(1.0)  # anything redelivered after the commit must not add rows
        assert Telemetry.objects.filter(device=meter).count() == total
        seqs = set(Telemetry.objects.filter(device=meter).values_list("seq", flat=True))
        assert seqs == set(range(1, total + 1))
        pub.loop_stop()
        pub.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _listener_subscribed(broker, device_id: str) -> bool:
    """True once a probe message reaches the database: the listener is up and subscribed."""
    probe = mqtt.Client(CallbackAPIVersion.VERSION2)
    probe.connect(broker.host, broker.port)
    probe.loop_start()
    probe.publish(f"iot/{device_id}/status", "online", qos=1).wait_for_publish(5)
    probe.loop_stop()
    probe.disconnect()
    time.sleep(0.3)
    return Device.objects.get(device_id=device_id).connection == Connection.ONLINE


def test_sigterm_stops_the_listener_cleanly(mqtt_broker, transactional_db):
    proc = start_listener_process(mqtt_broker, f"term-{uuid.uuid4().hex[:6]}")
    seen = []
    for line in proc.stderr:  # wait until it is really running: connected to the broker
        seen.append(line)
        if b"event=connected" in line:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    rest = proc.stderr.read()
    assert b"event=stopped" in rest
    assert b"Traceback" not in b"".join(seen) + rest


def _batching_subscriber(
    broker, client_id: str, topic: str, received: list, protocol: int
) -> BatchingClient:
    kwargs = {"clean_session": False} if protocol == mqtt.MQTTv311 else {}
    client = BatchingClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        manual_ack=True,
        **kwargs,
    )
    client.on_messages = received.extend
    connect_kwargs = {}
    if protocol == mqtt.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        connect_kwargs = {"clean_start": False, "properties": props}
    client.connect(broker.host, broker.port, **connect_kwargs)
    client.subscribe(topic, qos=1)
    client.loop_start()
    return client


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_batching_client_hands_over_every_publish_and_acks_only_what_it_is_told(
    private_mosquitto, protocol, monkeypatch
):
    """Many small messages (packets split across reads, most decoded by `take_publishes`), one
    larger than a read, one with v5 properties (paho's own decoding), QoS 0 and 1, a retained
    one; then only the acknowledged QoS 1 messages are gone from the session: the others come
    back after a reconnect."""
    broker = private_mosquitto
    uid = uuid.uuid4().hex[:6]
    decoded = []  # by take_publishes, not paho

    def counting(buf, pos, out, **kwargs):
        before = len(out)
        end = take_publishes(buf, pos, out, **kwargs)
        decoded.append(len(out) - before)
        return end

    monkeypatch.setattr(mqtt_module, "take_publishes", counting)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bt-pub-{uid}", protocol=protocol)
    pub.max_inflight_messages_set(1000)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    pub.publish(f"bt/{uid}/retained", b"kept", qos=1, retain=True).wait_for_publish(10)

    received: list = []
    sub = _batching_subscriber(broker, f"bt-sub-{uid}", f"bt/{uid}/#", received, protocol)
    wait_for(lambda: len(received) == 1)
    assert received[0] == (f"bt/{uid}/retained", b"kept", 1, received[0][3], True)

    expected = []
    for i in range(1500):
        topic, qos = f"bt/{uid}/small/{i % 7}", i % 2
        expected.append((topic, str(i).encode() * 3, qos))
    big = bytes(range(256)) * (300 * 1024 // 256)  # more than BatchingClient.READ_SIZE
    expected.insert(700, (f"bt/{uid}/big", big, 1))
    expected.insert(800, (f"bt/{uid}/empty", b"", 1))
    with_props = None
    if protocol == mqtt.MQTTv5:
        with_props = Properties(PacketTypes.PUBLISH)
        with_props.UserProperty = ("k", "v")
        expected.insert(900, (f"bt/{uid}/props", b"p", 1))
    for topic, payload, qos in expected:
        props = with_props if topic.endswith("/props") else None
        info = pub.publish(topic, payload, qos=qos, properties=props)
    info.wait_for_publish(30)
    wait_for(lambda: len(received) == 1 + len(expected))
    got = received[1:]
    assert [(t, p, q) for t, p, q, _, _ in got] == expected  # one publisher: in order
    assert not any(retained for *_, retained in got)
    assert all(type(p) is bytes for _, p, *_ in got)
    assert sum(decoded) > len(expected) // 2  # most of them straight from the read buffer

    qos1 = [m for m in got if m[2] == 1]
    acked = {m[3] for m in qos1[::2]}
    sub.ack_many(sorted(acked))
    time.sleep(0.5)  # the PUBACKs reach the broker before we drop the connection
    sub.disconnect()
    sub.loop_stop()

    again: list = []
    sub = _batching_subscriber(broker, f"bt-sub-{uid}", f"bt/{uid}/#", again, protocol)
    expect_again = {(t, p) for t, p, q, mid, _ in qos1 if mid not in acked}
    wait_for(lambda: len(again) >= len(expect_again) + 1)  # + the retained one, resent
    time.sleep(0.5)
    assert {(t, p) for t, p, *_ in again if not t.endswith("/retained")} == expect_again
    sub.disconnect()
    sub.loop_stop()
    pub.publish(f"bt/{uid}/retained", b"", qos=1, retain=True).wait_for_publish(10)
    pub.loop_stop()
    pub.disconnect()


def test_two_copies_behind_a_shared_subscription_store_each_message_once(
    private_mosquitto, transactional_db, alice_owner
):
    broker = private_mosquitto
    uid = uuid.uuid4().hex[:6]
    meters = [
        Device.objects.create(owner=alice_owner, device_id=f"m{n}-{uid}", profile=Profile.METER_V2)
        for n in range(3)
    ]
    procs = [start_listener_process(broker, f"shared-{n}-{uid}", group=f"g{uid}") for n in (0, 1)]
    try:
        for proc in procs:
            for line in proc.stderr:
                if b"event=connected" in line:
                    break
        time.sleep(0.5)  # subscriptions granted
        pub = publisher(broker)
        total = 600
        for seq in range(1, total // 3 + 1):
            for meter in meters:
                body = {"v": 2, "seq": seq, "msg_type": "telemetry", "data": {"power": 1.0}}
                info = pub.publish(f"iot/{meter.device_id}/telemetry", json.dumps(body), qos=1)
        info.wait_for_publish(30)
        stored = Telemetry.objects.filter(device__in=meters)
        wait_for(lambda: stored.count() >= total, timeout=60)
        time.sleep(0.5)
        assert stored.count() == total
        for meter in meters:
            seqs = sorted(stored.filter(device=meter).values_list("seq", flat=True))
            assert seqs == list(range(1, total // 3 + 1))
        pub.loop_stop()
        pub.disconnect()
    finally:
        logs = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            logs.append(proc.communicate(timeout=30)[1].decode())
    # Each copy took a share of the stream (the broker alternates between them).
    shares = [int(log.split("event=stopped", 1)[1].split("stored=")[1].split()[0]) for log in logs]
    assert sum(shares) == total
    assert all(share > 0 for share in shares), shares


def test_inbox_hands_over_in_order_splits_lists_at_the_batch_size_and_pushes_back():
    def messages(*names: str) -> list[InboundMessage]:
        return [InboundMessage(topic=n, payload=b"", received_at=None) for n in names]

    inbox, stop = Inbox(limit=6), threading.Event()
    assert inbox.put(messages("a", "b", "c"), stop)
    assert inbox.put(messages("d", "e", "f", "g"), stop)  # below the limit when it came
    assert len(inbox) == 7
    assert [m.topic for m in inbox.take(5, wait=0, fill=0)] == ["a", "b", "c", "d", "e"]
    assert [m.topic for m in inbox.take(5, wait=0, fill=0)] == ["f", "g"]
    assert inbox.take(5, wait=0, fill=0) == []

    assert inbox.put(messages(*"hijklm"), stop)
    stop.set()
    assert not inbox.put(messages("late"), stop)  # full and stopping: left to the broker
    assert len(inbox) == 6


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_retiring_a_copy_ingests_its_queue_and_ends_its_session(
    private_mosquitto, transactional_db, alice_owner, protocol
):
    # Scaling down: the broker keeps assigning a share of the stream to a stopped copy's
    # session. `mqtt_listen --retire` must store that share and end the session.
    broker = private_mosquitto
    uid = uuid.uuid4().hex[:6]
    group, staying, leaving = f"g{uid}", f"stay-{uid}", f"leave-{uid}"
    meter = Device.objects.create(owner=alice_owner, device_id=f"m-{uid}", profile=Profile.METER_V2)
    with override_settings(MQTT_PROTOCOL=protocol):

        def copy(client_id: str) -> tuple[Listener, threading.Thread]:
            listener = Listener(url=broker.url, group=group, client_id=client_id, batch_ms=20)
            thread = threading.Thread(target=listener.run, daemon=True)
            thread.start()
            assert listener.wait_connected(10)
            time.sleep(0.3)  # subscriptions granted
            return listener, thread

        gone, thread = copy(leaving)
        gone.stop()
        thread.join(20)  # stopped, its persistent session (and subscription) kept
        stay, stay_thread = copy(staying)
        pub = publisher(broker)
        try:

            def send(first: int, count: int) -> None:
                for seq in range(first, first + count):
                    body = {"v": 2, "seq": seq, "msg_type": "telemetry", "data": {"power": 1.0}}
                    info = pub.publish(f"iot/{meter.device_id}/telemetry", json.dumps(body), qos=1)
                info.wait_for_publish(30)

            send(1, 60)
            stored = Telemetry.objects.filter(device=meter)
            wait_for(lambda: stored.count() >= stay.stats.received > 0)
            queued = 60 - stay.stats.received
            assert queued > 0  # the stopped copy's share waits in its session

            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            out = io.StringIO()
            try:
                call_command(
                    "mqtt_listen",
                    "--retire",
                    "--no-live",
                    f"--url={broker.url}",
                    f"--group={group}",
                    f"--client-id={leaving}",
                    stdout=out,
                )
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
                gc.unfreeze()  # the command tunes the collector of this process
            assert f"{queued} messages stored" in out.getvalue()
            assert sorted(stored.values_list("seq", flat=True)) == list(range(1, 61))

            # From now on every message goes to the copy that stays.
            send(61, 20)
            wait_for(lambda: stored.count() >= 80)
            time.sleep(0.5)
            assert sorted(stored.values_list("seq", flat=True)) == list(range(1, 81))
        finally:
            pub.loop_stop()
            pub.disconnect()
            stay.stop()
            stay_thread.join(20)

        # The retired session is gone: connecting with its id finds none.
        present = threading.Event()
        found = {}
        v5 = protocol == "5"
        probe = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=leaving,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            **({} if v5 else {"clean_session": False}),
        )

        def on_connect(client, userdata, flags, reason_code, properties):
            found["session_present"] = flags.session_present
            present.set()

        probe.on_connect = on_connect
        probe.connect(broker.host, broker.port, **({"clean_start": False} if v5 else {}))
        probe.loop_start()
        try:
            assert present.wait(10)
            assert found["session_present"] is False
        finally:
            probe.disconnect()
            probe.loop_stop()
