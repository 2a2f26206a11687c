"""Each simulated profile speaks SPEC §4 from the device side (no broker: a fake host)."""

from __future__ import annotations

import re

import pytest

from apps.devices.simulator.base import DeviceOptions
from apps.devices.simulator.esp32_lamp import Esp32Lamp
from apps.devices.simulator.meter_v2 import AC, DC, MeterV2
from apps.devices.simulator.tasmota import Tasmota
from tests.devices.simkit import FakeHost, body, make

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


# --- esp32-lamp ---------------------------------------------------------------------------


def test_lamp_will_is_retained_offline_and_online_announces_lwt_then_status(host):
    lamp = make(Esp32Lamp, host, device_id="lamp-1")
    will = lamp.will()
    assert (will.topic, will.payload, will.retain, will.qos) == (
        "home/lamp-1/lwt",
        b"OFFLINE",
        True,
        1,
    )
    lwt, status = lamp.online()
    assert (lwt.topic, lwt.payload, lwt.retain) == ("home/lamp-1/lwt", b"ONLINE", True)
    assert status.topic == "home/lamp-1/status" and not status.retain
    assert lamp.offline() == will
    assert lamp.subscriptions() == ["home/lamp-1/cmd"]


def test_lamp_status_has_every_contract_field(host):
    lamp = make(Esp32Lamp, host, device_id="lamp-1", power={"1": "ON"})
    host.advance(42)
    (status,) = lamp.report()
    data = body(status)
    assert set(data) == {"deviceId", "power", "rssi", "uptime", "fw", "ip", "ts"}
    assert data["deviceId"] == "lamp-1" and data["power"] == "ON"  # restored from the spec
    assert data["uptime"] == 42
    assert -90 <= data["rssi"] <= -35
    assert re.fullmatch(r"192\.168\.\d+\.\d+", data["ip"])
    assert ISO_MS.match(data["ts"]) and data["ts"].startswith("2026-01-01T00:00:42")


@pytest.mark.parametrize(
    ("before", "action", "after"),
    [
        ("OFF", "ON", "ON"),
        ("ON", "OFF", "OFF"),
        ("OFF", "TOGGLE", "ON"),
        ("ON", "toggle", "OFF"),
        ("ON", "ON", "ON"),
    ],
)
def test_lamp_applies_a_command_and_echoes_its_request_id(host, before, action, after):
    lamp = make(Esp32Lamp, host, device_id="lamp-1", power={"1": before})
    lamp.handle(
        "home/lamp-1/cmd",
        b'{"deviceId":"lamp-1","action":"%s","requestId":"r-1"}' % action.encode(),
    )
    (status,) = host.take()
    assert status.topic == "home/lamp-1/status"
    assert body(status)["power"] == after and body(status)["requestId"] == "r-1"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1,2]",
        b'{"deviceId":"someone-else","action":"ON","requestId":"r"}',
        b'{"deviceId":"lamp-1","action":"EXPLODE","requestId":"r"}',
    ],
)
def test_lamp_ignores_commands_it_cannot_apply(host, payload):
    lamp = make(Esp32Lamp, host, device_id="lamp-1")
    lamp.handle("home/lamp-1/cmd", payload)
    assert host.take() == [] and lamp.power == "OFF"


# --- tasmota ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "cmnd", "stat", "tele"),
    [
        ("prefix", "cmnd/plug_A1/#", "stat/plug_A1/", "tele/plug_A1/"),
        ("topic", "plug_A1/cmnd/#", "plug_A1/stat/", "plug_A1/tele/"),
    ],
)
def test_tasmota_topics_follow_the_fulltopic_order(host, order, cmnd, stat, tele):
    plug = make(Tasmota, host, topic="plug_A1", topic_order=order)
    assert plug.subscriptions() == [cmnd]
    assert plug.will().topic == tele + "LWT" and plug.will().payload == b"Offline"
    lwt, state, sensor = plug.online()
    assert (lwt.topic, lwt.payload, lwt.retain) == (tele + "LWT", b"Online", True)
    assert (state.topic, sensor.topic) == (tele + "STATE", tele + "SENSOR")
    plug.handle(cmnd[:-1] + "POWER", b"ON")
    result, power = host.take()
    assert (result.topic, power.topic) == (stat + "RESULT", stat + "POWER")


def test_tasmota_state_looks_like_real_tasmota(host):
    relay = make(Tasmota, host, topic="r4", relay_count=4, power={"2": "ON"})
    host.advance(90061)  # 1 day, 1 h, 1 min, 1 s
    (state,) = relay.report()  # a multi-relay module has no energy monitor by default
    data = body(state)
    assert data["Time"] == "2026-01-02T01:01:01"
    assert data["Uptime"] == "1T01:01:01" and data["UptimeSec"] == 90061
    assert [data[f"POWER{n}"] for n in range(1, 5)] == ["OFF", "ON", "OFF", "OFF"]
    assert "POWER" not in data
    assert set(data["Wifi"]) == {
        "AP",
        "SSId",
        "BSSId",
        "Channel",
        "Mode",
        "RSSI",
        "Signal",
        "LinkCount",
        "Downtime",
    }
    assert 0 <= data["Wifi"]["RSSI"] <= 100 and data["Wifi"]["Signal"] < 0
    for key in ("Heap", "SleepMode", "LoadAvg"):
        assert key in data


def test_tasmota_plug_energy_accumulates_while_on_and_rolls_over_at_midnight(host):
    plug = make(Tasmota, host, topic="p1", power={"1": "ON"})
    first = body(plug.report()[1])["ENERGY"]
    assert set(first) >= {
        "Total",
        "Yesterday",
        "Today",
        "Power",
        "ApparentPower",
        "ReactivePower",
        "Factor",
        "Voltage",
        "Current",
    }
    assert first["Power"] > 0 and 0 < first["Factor"] <= 1
    assert first["Current"] == pytest.approx(first["ApparentPower"] / first["Voltage"], rel=0.05)
    host.advance(3600)
    second = body(plug.report()[1])["ENERGY"]
    assert second["Total"] > first["Total"]
    plug.handle("cmnd/p1/POWER", b"OFF")
    host.advance(3600)
    off = body(plug.report()[1])["ENERGY"]
    assert (
        off["Power"] == 0
        and off["Current"] == 0
        and off["Total"] == pytest.approx(second["Total"], abs=0.002)
    )
    host.advance(86400)  # next day
    rolled = body(plug.report()[1])["ENERGY"]
    assert rolled["Today"] == 0 and rolled["Yesterday"] == pytest.approx(off["Today"], abs=0.002)


def test_tasmota_single_relay_answers_as_power_even_when_asked_as_power1(host):
    plug = make(Tasmota, host, topic="p1")
    plug.handle("cmnd/p1/POWER1", b"on")
    result, power = host.take()
    assert body(result) == {"POWER": "ON"}
    assert (power.topic, power.payload, power.retain) == ("stat/p1/POWER", b"ON", False)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"ON", "ON"),
        (b"1", "ON"),
        (b"TOGGLE", "ON"),
        (b"2", "ON"),
        (b"OFF", "OFF"),
        (b"", "OFF"),
        (b"bogus", "OFF"),
    ],
)
def test_tasmota_multi_relay_switches_only_the_addressed_relay(host, payload, expected):
    relay = make(Tasmota, host, topic="r2", relay_count=2, topic_order="topic")
    relay.handle("r2/cmnd/POWER2", payload)
    result, power = host.take()
    assert result.topic == "r2/stat/RESULT" and body(result) == {"POWER2": expected}
    assert (power.topic, power.payload) == ("r2/stat/POWER2", expected.encode())
    assert relay.relays == {1: "OFF", 2: expected}


def test_tasmota_answers_unknown_for_a_relay_it_does_not_have_and_other_commands(host):
    relay = make(Tasmota, host, topic="r2", relay_count=2)
    relay.handle("cmnd/r2/POWER3", b"ON")
    relay.handle("cmnd/r2/Reboot", b"1")
    assert [body(m) for m in host.take()] == [{"Command": "Unknown"}] * 2
    assert relay.relays == {1: "OFF", 2: "OFF"}


def test_tasmota_power0_switches_every_relay(host):
    relay = make(Tasmota, host, topic="r3", relay_count=3)
    relay.handle("cmnd/r3/POWER0", b"ON")
    sent = host.take()
    assert [m.topic for m in sent[1::2]] == ["stat/r3/POWER1", "stat/r3/POWER2", "stat/r3/POWER3"]
    assert relay.relays == {1: "ON", 2: "ON", 3: "ON"}


def test_tasmota_teleperiod_changes_the_report_interval_within_tasmota_limits(host):
    plug = make(Tasmota, host, topic="p1", interval=300)
    plug.handle("cmnd/p1/TelePeriod", b"30")
    plug.handle("cmnd/p1/TELEPERIOD", b"2")
    plug.handle("cmnd/p1/teleperiod", b"")
    assert [body(m) for m in host.take()] == [
        {"TelePeriod": 30},
        {"TelePeriod": 10},
        {"TelePeriod": 10},
    ]
    assert plug.interval == 10


# --- meter-v2 -----------------------------------------------------------------------------


def test_meter_hello_then_telemetry_in_envelopes_with_increasing_seq(host):
    meter = make(MeterV2, host, device_id="m-1", device_type=DC)
    status, hello = meter.online()
    assert (status.topic, body(status), status.retain) == (
        "iot/m-1/status",
        {"status": "online"},
        True,
    )
    will = meter.will()
    assert (will.topic, body(will), will.retain) == ("iot/m-1/status", {"status": "offline"}, True)
    h = body(hello)
    assert hello.topic == "iot/m-1/hello"
    assert (h["v"], h["seq"], h["msg_type"]) == (2, 1, "hello")
    assert h["device_type"] == DC and h["fw_version"] and h["boot_id"] and ISO_MS.match(h["ts"])
    seqs = []
    for _ in range(3):
        host.advance(1)
        (telemetry,) = meter.report()
        t = body(telemetry)
        assert telemetry.topic == "iot/m-1/telemetry"
        assert t["msg_type"] == "telemetry" and t["boot_id"] == h["boot_id"]
        seqs.append(t["seq"])
    assert seqs == [2, 3, 4]


def test_meter_sends_a_hello_heartbeat_every_hello_interval(host):
    meter = make(MeterV2, host, options=DeviceOptions(hello_interval=30))
    meter.online()
    host.advance(10)
    assert [m.kind for m in meter.report()] == ["telemetry"]
    host.advance(25)
    assert [m.kind for m in meter.report()] == ["hello", "telemetry"]


def test_dc_traction_meter_readings_are_consistent_over_a_long_run(host):
    meter = make(MeterV2, host, device_type=DC)
    last_energy, peak = None, 0.0
    for _ in range(600):  # 30 min at 3 s: trains come and go
        host.advance(3)
        data = body(meter.report()[-1])["data"]
        assert 500 <= data["voltage"] <= 900  # EN 50163 for 750 V systems
        # Rounded to 0.1 V and 0.1 A on the wire: up to ~0.2 kW apart at 3 kA.
        assert data["power"] == pytest.approx(data["voltage"] * data["current"] / 1000, abs=0.2)
        if last_energy is not None:
            assert data["energy"] >= last_energy  # a register never runs backwards
        last_energy, peak = data["energy"], max(peak, data["current"])
    assert peak > 1000  # at least one train accelerated


@pytest.mark.parametrize("phases", [3, 1])
def test_ac_meter_readings_are_plausible(host, phases):
    meter = make(MeterV2, host, device_type=AC, phases=phases)
    host.advance(10)
    data = body(meter.report()[-1])["data"]
    assert 207 <= data["voltage"] <= 253 and 49.9 <= data["frequency"] <= 50.1
    assert 0.75 <= data["power_factor"] <= 0.99
    assert data["power"] == pytest.approx(data["apparent_power"] * data["power_factor"], rel=0.01)
    assert data["phases"] == phases
    assert ("voltage_l3" in data) == (phases == 3)
    if phases == 3:
        assert 380 <= data["voltage_ll"] <= 420


def command(name: str, params: dict | None = None, command_id: str = "c-1", v: int = 2) -> bytes:
    import json

    return json.dumps(
        {"v": v, "command_id": command_id, "name": name, "params": params or {}}
    ).encode()


@pytest.mark.parametrize(
    ("payload", "status", "detail"),
    [
        (command("ping"), "ok", "pong"),
        (command("set_interval", {"interval_s": 5}), "ok", "interval set to 5 s"),
        (command("set_interval", {"interval_s": "fast"}), "error", "params.interval_s"),
        (command("self_destruct"), "error", "unknown command"),
        (command("ping", v=1), "error", "unsupported envelope version"),
        (command("ota", {}), "error", "params.version is required"),
    ],
)
def test_meter_acknowledges_every_command_it_can_identify(host, payload, status, detail):
    meter = make(MeterV2, host, device_id="m-1")
    meter.handle("iot/m-1/command", payload)
    (ack,) = host.take()
    a = body(ack)
    assert ack.topic == "iot/m-1/command/ack"
    assert (a["v"], a["msg_type"], a["command_id"], a["status"]) == (
        2,
        "command_ack",
        "c-1",
        status,
    )
    assert a["detail"].startswith(detail)


@pytest.mark.parametrize("payload", [b"{not json", b'{"v":2,"name":"ping"}', b'"ping"'])
def test_meter_drops_commands_without_a_command_id(host, payload):
    meter = make(MeterV2, host)
    meter.handle(f"iot/{meter.device_id}/command", payload)
    assert host.take() == []


def test_meter_reboot_acks_then_reboots_with_a_new_boot_id_and_seq_from_one(host):
    meter = make(MeterV2, host, device_id="m-1")
    meter.online()
    old_boot = meter.boot_id
    meter.handle("iot/m-1/command", command("reboot"))
    assert body(host.take()[0])["detail"] == "rebooting" and host.reboots == []
    host.advance(0.5)
    assert host.reboots == [meter]
    assert meter.boot_id != old_boot
    _, hello = meter.online()
    assert body(hello)["seq"] == 1 and body(hello)["boot_id"] == meter.boot_id


def test_meter_ota_reports_progress_then_reboots_into_the_new_version(host):
    meter = make(MeterV2, host, device_id="m-1")
    meter.handle("iot/m-1/command", command("ota", {"version": "3.0.0", "url": "https://x/fw.bin"}))
    host.advance(20)
    ack, *ota = host.take()
    assert body(ack)["status"] == "ok"
    states = [(body(m)["state"], body(m).get("progress")) for m in ota]
    assert states == [
        ("downloading", 0),
        ("downloading", 25),
        ("downloading", 50),
        ("downloading", 75),
        ("downloading", 100),
        ("applying", None),
        ("done", None),
    ]
    assert all(m.topic == "iot/m-1/ota/status" and body(m)["version"] == "3.0.0" for m in ota)
    seq = body(ack)["seq"]
    assert [body(m)["seq"] for m in ota] == list(range(seq + 1, seq + 8))
    assert host.reboots == [meter] and body(meter.hello())["fw_version"] == "3.0.0"


def test_meter_failed_ota_keeps_the_old_version_and_does_not_reboot(host):
    meter = make(MeterV2, host, device_id="m-1")
    meter.handle("iot/m-1/command", command("ota", {"version": "3.0.0", "fail": True}))
    host.advance(20)
    states = [body(m)["state"] for m in host.take()[1:]]
    assert states == ["downloading"] * 3 + ["failed"]
    assert host.reboots == [] and meter.fw_version != "3.0.0"


def test_meter_ota_steps_die_with_the_boot_that_started_them(host):
    meter = make(MeterV2, host, device_id="m-1")
    meter.handle("iot/m-1/command", command("ota", {"version": "3.0.0"}))
    host.advance(1.5)
    meter.boot()  # power cut mid-download
    host.take()
    host.advance(20)
    assert host.take() == [] and host.reboots == []
