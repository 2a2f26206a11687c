"""The simulator on a real broker: the embedded amqtt one always, Mosquitto when available.

A spy subscriber checks what really reached the broker; nothing here trusts the simulator's own
account of what it sent.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from apps.devices.simulator import Broker, DeviceOptions, DeviceSpec, RunOptions, Simulator
from apps.devices.simulator.meter_v2 import AC, DC
from tests.devices.simbroker import SimBroker
from tests.devices.simkit import Spy

FAST = DeviceOptions(qos=1, hello_interval=0, ota_step=0.05, reboot_delay=0.1)


@pytest.fixture(scope="module")
def embedded_broker() -> Iterator[SimBroker]:
    broker = SimBroker.embedded()
    yield broker
    broker.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request) -> SimBroker:
    if request.param == "mosquitto":
        return SimBroker.mosquitto()
    return request.getfixturevalue("embedded_broker")


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def spies() -> Iterator[list[Spy]]:
    made: list[Spy] = []
    yield made
    for spy in made:
        spy.close()


@contextmanager
def simulating(broker: SimBroker, specs: list[DeviceSpec], options: DeviceOptions = FAST, **run):
    simulator = Simulator(
        specs,
        RunOptions(broker=Broker.parse(broker.url), protocol=broker.protocol, **run),
        options,
        seed=7,
    )
    thread = threading.Thread(target=simulator.run, name="simulator", daemon=True)
    thread.start()
    try:
        yield simulator
    finally:
        simulator.request_stop()
        thread.join(20)
        assert not thread.is_alive(), "the simulator did not stop"


def spy_on(broker: SimBroker, spies: list[Spy], *topics: str) -> Spy:
    spy = Spy(broker.host, broker.port, list(topics))
    spies.append(spy)
    return spy


def test_each_profile_announces_itself_and_reports_per_contract(broker, spies, uid):
    lamp, plug, relay, dc, ac = (
        f"{uid}-lamp",
        f"{uid}-plug",
        f"{uid}-relay",
        f"{uid}-dc",
        f"{uid}-ac",
    )
    specs = [
        DeviceSpec(lamp, "esp32-lamp", interval=0.1),
        DeviceSpec(plug, "tasmota", topic=f"{uid}_Plug", interval=0.1),
        DeviceSpec(relay, "tasmota", topic=relay, topic_order="topic", relay_count=2, interval=0.1),
        DeviceSpec(dc, "meter-v2", device_type=DC, interval=0.1),
        DeviceSpec(ac, "meter-v2", device_type=AC, interval=0.1),
    ]
    spy = spy_on(
        broker,
        spies,
        f"home/{lamp}/#",
        f"+/{uid}_Plug/#",
        f"{relay}/#",
        f"iot/{dc}/#",
        f"iot/{ac}/#",
    )
    with simulating(broker, specs):
        spy.wait_on(f"home/{lamp}/status", 3)
        spy.wait_on(f"tele/{uid}_Plug/SENSOR", 3)
        spy.wait_on(f"{relay}/tele/STATE", 3)
        spy.wait_on(f"iot/{dc}/telemetry", 3)
        spy.wait_on(f"iot/{ac}/telemetry", 3)
        # Joining late: the presence topics are retained, so a new subscriber learns them.
        late = spy_on(
            broker,
            spies,
            f"home/{lamp}/lwt",
            f"tele/{uid}_Plug/LWT",
            f"{relay}/tele/LWT",
            f"iot/{dc}/status",
        )
        retained = late.wait(lambda s: len(s.seen) >= 4 and s.seen)
        assert {(m.topic, m.payload, m.retain) for m in retained} == {
            (f"home/{lamp}/lwt", b"ONLINE", True),
            (f"tele/{uid}_Plug/LWT", b"Online", True),
            (f"{relay}/tele/LWT", b"Online", True),
            (f"iot/{dc}/status", b'{"status":"online"}', True),
        }

    status = spy.on(f"home/{lamp}/status")[-1].json()
    assert status["deviceId"] == lamp and status["power"] in ("ON", "OFF")
    assert {"rssi", "uptime", "fw", "ip", "ts"} <= set(status)

    state = spy.on(f"tele/{uid}_Plug/STATE")[-1].json()
    assert state["POWER"] == "OFF" and "RSSI" in state["Wifi"] and "UptimeSec" in state
    energy = spy.on(f"tele/{uid}_Plug/SENSOR")[-1].json()["ENERGY"]
    assert {"Total", "Today", "Yesterday", "Power", "Voltage", "Current", "Factor"} <= set(energy)
    relay_state = spy.on(f"{relay}/tele/STATE")[-1].json()
    assert relay_state["POWER1"] == relay_state["POWER2"] == "OFF"
    assert spy.on(f"{relay}/tele/SENSOR") == []  # a 2-relay module without energy monitor

    for meter, device_type in ((dc, DC), (ac, AC)):
        hello = spy.on(f"iot/{meter}/hello")[0].json()
        assert (hello["v"], hello["msg_type"], hello["seq"]) == (2, "hello", 1)
        assert hello["device_type"] == device_type and hello["boot_id"]
        readings = [m.json() for m in spy.on(f"iot/{meter}/telemetry")]
        assert [r["seq"] for r in readings] == list(range(2, 2 + len(readings)))
        assert all(r["boot_id"] == hello["boot_id"] for r in readings)
        assert {"voltage", "current", "power", "energy"} <= set(readings[-1]["data"])
    dc_volts = spy.on(f"iot/{dc}/telemetry")[-1].json()["data"]["voltage"]
    assert 500 <= dc_volts <= 900


def test_commands_are_answered_per_profile(broker, spies, uid):
    lamp, plug, relay, meter = f"{uid}-lamp", f"{uid}-plug", f"{uid}-relay", f"{uid}-meter"
    specs = [
        DeviceSpec(lamp, "esp32-lamp", interval=5),
        DeviceSpec(plug, "tasmota", topic=plug, interval=5),
        DeviceSpec(relay, "tasmota", topic=relay, topic_order="topic", relay_count=2, interval=5),
        DeviceSpec(meter, "meter-v2", interval=5),
    ]
    spy = spy_on(
        broker,
        spies,
        f"home/{lamp}/status",
        f"stat/{plug}/#",
        f"{relay}/stat/#",
        f"iot/{meter}/command/ack",
        f"iot/{meter}/hello",
    )
    with simulating(broker, specs) as sim:
        spy.wait_on(f"iot/{meter}/hello")
        spy.wait_on(f"home/{lamp}/status")  # the status after connect: subscribed by now
        request_id = str(uuid.uuid4())
        spy.publish(
            f"home/{lamp}/cmd",
            json.dumps({"deviceId": lamp, "action": "ON", "requestId": request_id}),
        )
        spy.publish(f"cmnd/{plug}/POWER", "ON")
        spy.publish(f"{relay}/cmnd/POWER2", "TOGGLE")
        spy.publish(
            f"iot/{meter}/command",
            json.dumps({"v": 2, "command_id": "cmd-1", "name": "ping", "params": {}}),
        )
        echoed = spy.wait(
            lambda s: [m.json() for m in s.on(f"home/{lamp}/status") if b"requestId" in m.payload]
        )
        assert echoed[0]["requestId"] == request_id and echoed[0]["power"] == "ON"

        assert spy.wait_on(f"stat/{plug}/RESULT")[0].json() == {"POWER": "ON"}
        assert spy.wait_on(f"stat/{plug}/POWER")[0].text == "ON"
        assert spy.wait_on(f"{relay}/stat/RESULT")[0].json() == {"POWER2": "ON"}
        assert spy.wait_on(f"{relay}/stat/POWER2")[0].text == "ON"
        ack = spy.wait_on(f"iot/{meter}/command/ack")[0].json()
        assert (ack["command_id"], ack["status"], ack["msg_type"]) == ("cmd-1", "ok", "command_ack")
        assert sim.stats.commands == {"esp32-lamp": 1, "tasmota": 2, "meter-v2": 1}


def test_meter_reboot_fires_the_will_then_restarts_seq_with_a_new_boot_id(broker, spies, uid):
    meter = f"{uid}-meter"
    spy = spy_on(broker, spies, f"iot/{meter}/#")
    with simulating(broker, [DeviceSpec(meter, "meter-v2", interval=0.05)]):
        spy.wait_on(f"iot/{meter}/telemetry", 3)
        spy.publish(
            f"iot/{meter}/command", json.dumps({"v": 2, "command_id": "r-1", "name": "reboot"})
        )
        spy.wait_on(f"iot/{meter}/hello", 2)
        spy.wait(lambda s: len(s.on(f"iot/{meter}/telemetry")) >= 6)

    presence = [m.json()["status"] for m in spy.on(f"iot/{meter}/status")]
    assert presence[:3] == ["online", "offline", "online"]  # the will, fired by the broker
    first, second = (m.json() for m in spy.on(f"iot/{meter}/hello")[:2])
    assert first["boot_id"] != second["boot_id"] and second["seq"] == 1
    messages = [
        m.json() for m in spy.seen if m.topic not in (f"iot/{meter}/status", f"iot/{meter}/command")
    ]
    for boot in (first["boot_id"], second["boot_id"]):
        seqs = [m["seq"] for m in messages if m["boot_id"] == boot]
        assert seqs == list(range(1, len(seqs) + 1))  # from 1, no gap, no repeat, per boot
    ack = next(m for m in messages if m["msg_type"] == "command_ack")
    assert ack["boot_id"] == first["boot_id"] and ack["status"] == "ok"


def test_meter_ota_reports_progress_and_comes_back_on_the_new_version(broker, spies, uid):
    meter = f"{uid}-meter"
    spy = spy_on(broker, spies, f"iot/{meter}/ota/status", f"iot/{meter}/hello")
    with simulating(broker, [DeviceSpec(meter, "meter-v2", interval=5)]):
        spy.wait_on(f"iot/{meter}/hello")
        command = {"v": 2, "command_id": "o-1", "name": "ota", "params": {"version": "9.9.9"}}
        spy.publish(f"iot/{meter}/command", json.dumps(command))
        hello = spy.wait_on(f"iot/{meter}/hello", 2)[1].json()
    states = [m.json()["state"] for m in spy.on(f"iot/{meter}/ota/status")]
    assert states == ["downloading"] * 5 + ["applying", "done"]
    assert hello["fw_version"] == "9.9.9" and hello["seq"] == 1


@pytest.mark.parametrize("shared", [False, True], ids=["own-connections", "shared-connection"])
def test_graceful_stop_publishes_offline_itself_before_disconnecting(broker, spies, uid, shared):
    lamp, plug, meter = f"{uid}-lamp", f"{uid}-plug", f"{uid}-meter"
    specs = [
        DeviceSpec(lamp, "esp32-lamp", interval=5),
        DeviceSpec(plug, "tasmota", topic=plug, interval=5),
        DeviceSpec(meter, "meter-v2", interval=5),
    ]
    spy = spy_on(broker, spies, f"home/{lamp}/lwt", f"tele/{plug}/LWT", f"iot/{meter}/status")
    with simulating(broker, specs, shared_connection=shared) as sim:
        spy.wait(lambda s: len(s.seen) >= 3)
    spy.wait(lambda s: len(s.seen) >= 6)
    presence = [spy.on(t) for t in (f"home/{lamp}/lwt", f"tele/{plug}/LWT", f"iot/{meter}/status")]
    assert [(p[0].payload, p[-1].payload) for p in presence] == [
        (b"ONLINE", b"OFFLINE"),
        (b"Online", b"Offline"),
        (b'{"status":"online"}', b'{"status":"offline"}'),
    ]
    # The devices said goodbye themselves, and the broker acknowledged everything.
    assert sim.stats.by_kind["goodbye"] == 3
    assert sim.stats.acknowledged == sim.stats.sent


def test_abrupt_stop_lets_the_broker_publish_every_will(broker, spies, uid):
    lamp, plug, meter = f"{uid}-lamp", f"{uid}-plug", f"{uid}-meter"
    specs = [
        DeviceSpec(lamp, "esp32-lamp", interval=5),
        DeviceSpec(plug, "tasmota", topic=plug, topic_order="topic", interval=5),
        DeviceSpec(meter, "meter-v2", interval=5),
    ]
    spy = spy_on(broker, spies, f"home/{lamp}/lwt", f"{plug}/tele/LWT", f"iot/{meter}/status")
    with simulating(broker, specs, abrupt=True) as sim:
        spy.wait(lambda s: len(s.seen) >= 3)
    spy.wait(lambda s: len(s.seen) >= 6)
    assert spy.on(f"home/{lamp}/lwt")[-1].payload == b"OFFLINE"
    assert spy.on(f"{plug}/tele/LWT")[-1].payload == b"Offline"
    assert spy.on(f"iot/{meter}/status")[-1].json() == {"status": "offline"}
    assert "goodbye" not in sim.stats.by_kind  # the devices said nothing: these were wills
    late = spy_on(broker, spies, f"home/{lamp}/lwt")
    assert late.wait_on(f"home/{lamp}/lwt")[0].payload == b"OFFLINE"  # and they are retained


def test_message_limit_stops_after_exactly_that_many_reports_all_delivered(broker, spies, uid):
    specs = [DeviceSpec(f"{uid}-m{i}", "meter-v2", interval=1) for i in range(5)]
    spy = spy_on(broker, spies, *(f"iot/{s.device_id}/telemetry" for s in specs))
    simulator = Simulator(
        specs,
        RunOptions(broker=Broker.parse(broker.url), protocol=broker.protocol, rate=0, messages=500),
        FAST,
    )
    stats = simulator.run()  # returns by itself once the 500th report is acknowledged
    assert stats.periodic == 500 and stats.by_kind["telemetry"] == 500
    assert stats.acknowledged == stats.sent
    spy.wait(lambda s: len(s.seen) >= 500)
    assert len(spy.seen) == 500


def test_shared_connection_routes_each_command_to_its_device(broker, spies, uid):
    lamps = [f"{uid}-lamp{i}" for i in range(3)]
    spy = spy_on(broker, spies, *(f"home/{lamp}/status" for lamp in lamps))
    specs = [DeviceSpec(lamp, "esp32-lamp", interval=5) for lamp in lamps]
    with simulating(broker, specs, shared_connection=True) as sim:
        spy.wait(lambda s: len(s.seen) >= 3)
        spy.publish(
            f"home/{lamps[1]}/cmd",
            json.dumps({"deviceId": lamps[1], "action": "ON", "requestId": "q-1"}),
        )
        answer = spy.wait(lambda s: [m for m in s.seen if b"q-1" in m.payload])
        assert answer[0].topic == f"home/{lamps[1]}/status"
        assert sim.stats.connects == 1
    assert [d.power for d in sim.devices] == ["OFF", "ON", "OFF"]


def test_it_reconnects_after_the_broker_restarts(spies, uid):
    broker = SimBroker.embedded()
    try:
        meter = f"{uid}-meter"
        with simulating(broker, [DeviceSpec(meter, "meter-v2", interval=0.1)]) as sim:
            spy = spy_on(broker, spies, f"iot/{meter}/telemetry")
            first = spy.wait_on(f"iot/{meter}/telemetry")[0].json()
            spy.close()
            spies.remove(spy)
            broker.stop()
            broker.start()  # same port, empty broker
            spy = spy_on(broker, spies, f"iot/{meter}/hello", f"iot/{meter}/telemetry")
            hello = spy.wait_on(f"iot/{meter}/hello", timeout=20)[0].json()
            later = spy.wait_on(f"iot/{meter}/telemetry")[0].json()
            assert sim.stats.connects >= 2
        # A lost connection is not a reboot: same boot, the sequence just goes on.
        assert hello["boot_id"] == first["boot_id"] and later["seq"] > first["seq"]
    finally:
        broker.stop()
