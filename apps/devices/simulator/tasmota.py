"""`tasmota` (SPEC §4.2): an off-the-shelf Tasmota relay or plug, as real Tasmota 13/14 behaves.

Topics follow the device's FullTopic order: `cmnd/{topic}/POWER1` (Tasmota's default
`%prefix%/%topic%/`) or `{topic}/cmnd/POWER1` (`%topic%/%prefix%/`).

    cmnd POWER[n]  <- ON|OFF|TOGGLE (also 1|0|2, any case); empty or unknown payload = query
    stat RESULT    -> {"POWER":"ON"} (single relay) or {"POWER2":"OFF"}, then
    stat POWER[n]  -> ON|OFF                                        (not retained, like Tasmota)
    tele STATE     -> every TelePeriod: Time, Uptime, UptimeSec, Heap, …, POWER[n], Wifi{…}
    tele SENSOR    -> with the STATE, plugs only: {"Time", "ENERGY": {Total, Today, Power, …}}
    tele LWT       -> Online / Offline, retained; Offline is the will

A single-relay device names its relay `POWER` in every reply (even when commanded as POWER1),
a multi-relay one `POWER1`..`POWERn`; a relay it does not have answers {"Command":"Unknown"}.
Real Tasmota also publishes `tele/…/INFO1..3` on connect; the platform's contract does not
include them, so the simulator leaves them out.
"""

from __future__ import annotations

from datetime import UTC, datetime

from apps.devices.models import Profile, TasmotaTopicOrder

from .base import Message, SimDevice, dumps

ON_WORDS = {"ON", "1", "TRUE"}
OFF_WORDS = {"OFF", "0", "FALSE"}
TOGGLE_WORDS = {"TOGGLE", "2"}
# Typical loads behind a smart plug, in watts: LED bulb, lamp, fan, TV, heater, kettle.
LOADS_W = (8.5, 42.0, 60.0, 118.0, 650.0, 1450.0)


def tasmota_time(epoch: float) -> str:
    # Tasmota prints local time without an offset; a simulated device lives in UTC.
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def tasmota_uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}T{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


class Tasmota(SimDevice):
    profile = Profile.TASMOTA

    def boot(self) -> None:
        super().boot()
        self.mqtt_count = 0
        if self.boots > 1:
            return
        spec, rng = self.spec, self.rng
        self.relays = {n: spec.power.get(str(n), "OFF") for n in range(1, spec.relay_count + 1)}
        self.has_energy = spec.relay_count == 1 if spec.energy is None else spec.energy
        self.rssi_dbm = rng.randint(-78, -48)
        self.channel = rng.choice((1, 6, 11))
        self.bssid = ":".join(f"{rng.randint(0, 255):02X}" for _ in range(6))
        self.load_w = rng.choice(LOADS_W)
        self.factor = round(rng.uniform(0.55, 0.99), 2)
        self.total_kwh = round(rng.uniform(5, 900), 3)
        self.today_kwh = round(rng.uniform(0, 1.5), 3)
        self.yesterday_kwh = round(rng.uniform(0, 3), 3)
        self.total_start = tasmota_time(self.clock() - rng.uniform(30, 400) * 86400)
        self.energy_at = self.clock()

    # --- topics -----------------------------------------------------------------------------
    def topic(self, prefix: str, suffix: str) -> str:
        t = self.spec.mqtt_topic
        if self.spec.topic_order == TasmotaTopicOrder.TOPIC_FIRST:
            return f"{t}/{prefix}/{suffix}"
        return f"{prefix}/{t}/{suffix}"

    def power_key(self, relay: int) -> str:
        return "POWER" if len(self.relays) == 1 else f"POWER{relay}"

    @property
    def reports_per_tick(self) -> int:
        return 2 if self.has_energy else 1

    # --- lifecycle --------------------------------------------------------------------------
    def will(self) -> Message:
        return self.msg(self.topic("tele", "LWT"), b"Offline", "lwt", retain=True)

    def online(self) -> list[Message]:
        self.mqtt_count += 1
        return [self.msg(self.topic("tele", "LWT"), b"Online", "lwt", retain=True), *self.report()]

    def offline(self) -> Message:
        return self.will()

    def subscriptions(self) -> list[str]:
        return [self.topic("cmnd", "#")]

    def report(self) -> list[Message]:
        out = [self.msg(self.topic("tele", "STATE"), dumps(self.state()), "state")]
        if self.has_energy:
            out.append(self.msg(self.topic("tele", "SENSOR"), dumps(self.sensor()), "sensor"))
        return out

    # --- payloads ---------------------------------------------------------------------------
    def state(self) -> dict[str, object]:
        now = self.clock()
        self.rssi_dbm = max(-92, min(-35, self.rssi_dbm + self.rng.randint(-2, 2)))
        body: dict[str, object] = {
            "Time": tasmota_time(now),
            "Uptime": tasmota_uptime(self.uptime),
            "UptimeSec": int(self.uptime),
            "Heap": self.rng.randint(21, 27),
            "SleepMode": "Dynamic",
            "Sleep": 50,
            "LoadAvg": self.rng.randint(10, 30),
            "MqttCount": self.mqtt_count,
        }
        for n, value in self.relays.items():
            body[self.power_key(n)] = value
        body["Wifi"] = {
            "AP": 1,
            "SSId": "iot-lab",
            "BSSId": self.bssid,
            "Channel": self.channel,
            "Mode": "11n",
            # Tasmota's RSSI is a 0–100 quality figure; Signal is the dBm value.
            "RSSI": max(0, min(100, 2 * (self.rssi_dbm + 100))),
            "Signal": self.rssi_dbm,
            "LinkCount": 1,
            "Downtime": "0T00:00:03",
        }
        return body

    def _load_w(self) -> float:
        on = sum(1 for v in self.relays.values() if v == "ON")
        return self.load_w * on

    def _integrate_energy(self) -> None:
        now = self.clock()
        if (
            datetime.fromtimestamp(now, UTC).date()
            != datetime.fromtimestamp(self.energy_at, UTC).date()
        ):
            self.yesterday_kwh, self.today_kwh = self.today_kwh, 0.0
        kwh = self._load_w() * max(0.0, now - self.energy_at) / 3.6e6
        self.total_kwh += kwh
        self.today_kwh += kwh
        self.energy_at = now

    def sensor(self) -> dict[str, object]:
        self._integrate_energy()
        voltage = round(self.rng.gauss(230.0, 1.5))
        load = self._load_w()
        if load:
            power = load * self.rng.uniform(0.98, 1.02)
            apparent = power / self.factor
            reactive = (apparent**2 - power**2) ** 0.5
            current = apparent / voltage
            factor = self.factor
        else:
            power = apparent = reactive = current = factor = 0.0
        return {
            "Time": tasmota_time(self.clock()),
            "ENERGY": {
                "TotalStartTime": self.total_start,
                "Total": round(self.total_kwh, 3),
                "Yesterday": round(self.yesterday_kwh, 3),
                "Today": round(self.today_kwh, 3),
                "Period": 0,
                "Power": round(power),
                "ApparentPower": round(apparent),
                "ReactivePower": round(reactive),
                "Factor": factor,
                "Voltage": voltage,
                "Current": round(current, 3),
            },
        }

    # --- commands ---------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        command = topic.rsplit("/", 1)[-1].upper()
        value = payload.decode("utf-8", errors="replace").strip().upper()
        if command.startswith("POWER") and (command[5:] == "" or command[5:].isdigit()):
            self._power(int(command[5:] or 1), value)
        elif command == "TELEPERIOD":
            self._teleperiod(value)
        elif command == "STATE":
            self._result(self.state())
        else:
            self._result({"Command": "Unknown"})

    def _result(self, body: dict[str, object]) -> None:
        self.publish(self.msg(self.topic("stat", "RESULT"), dumps(body), "result"))

    def _power(self, index: int, value: str) -> None:
        # POWER0 addresses every relay, as in Tasmota.
        targets = list(self.relays) if index == 0 else [index]
        if any(n not in self.relays for n in targets):
            self._result({"Command": "Unknown"})
            return
        if self.has_energy:
            self._integrate_energy()  # bill the energy used up to the switch at the old state
        for n in targets:
            if value in ON_WORDS:
                self.relays[n] = "ON"
            elif value in OFF_WORDS:
                self.relays[n] = "OFF"
            elif value in TOGGLE_WORDS:
                self.relays[n] = "OFF" if self.relays[n] == "ON" else "ON"
            # Anything else (an empty payload included) is a query: report without changing.
            key = self.power_key(n)
            self._result({key: self.relays[n]})
            self.publish(self.msg(self.topic("stat", key), self.relays[n].encode(), "power"))

    def _teleperiod(self, value: str) -> None:
        if value.isdigit():
            seconds = int(value)
            # Tasmota: 1 resets to the default 300 s; otherwise 10..3600 (0 would disable).
            seconds = 300 if seconds == 1 else min(3600, max(10, seconds))
            self.interval = float(seconds)
        self._result({"TelePeriod": int(self.interval)})
