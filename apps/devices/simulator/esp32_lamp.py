"""`esp32-lamp` (SPEC §4.1): the SmartLamp firmware in `firmware/esp32-smartlamp/`, simulated.

    home/{id}/cmd     <- {"deviceId", "action": ON|OFF|TOGGLE, "requestId"}
    home/{id}/status  -> {"deviceId", "power", "requestId"?, "rssi", "uptime", "fw", "ip", "ts"}
    home/{id}/lwt     -> ONLINE / OFFLINE, retained; OFFLINE is also the MQTT will

Like the firmware: the status goes out after connect, every interval, and after every command,
echoing the command's requestId so the platform can confirm it. A command for the state the
lamp is already in still gets its status (the platform is waiting for it).
"""

from __future__ import annotations

import json
import logging

from apps.devices.models import Profile

from .base import Message, SimDevice, dumps, iso_ms

log = logging.getLogger("iotplatform.simulator")

FIRMWARE = "1.3.0-sim"  # the real sketch reports FW_VERSION "1.3.0"
ACTIONS = ("ON", "OFF", "TOGGLE")


class Esp32Lamp(SimDevice):
    profile = Profile.ESP32_LAMP

    def boot(self) -> None:
        super().boot()
        if self.boots == 1:
            # The firmware restores the relay from flash; the simulator from the database.
            self.power = "ON" if self.spec.power.get("1") == "ON" else "OFF"
            self.rssi = self.rng.randint(-75, -45)
            self.ip = f"192.168.{self.rng.randint(0, 9)}.{self.rng.randint(20, 250)}"

    @property
    def base(self) -> str:
        return f"home/{self.device_id}"

    def will(self) -> Message:
        return self.msg(f"{self.base}/lwt", b"OFFLINE", "lwt", retain=True)

    def online(self) -> list[Message]:
        return [self.msg(f"{self.base}/lwt", b"ONLINE", "lwt", retain=True), self.status()]

    def offline(self) -> Message:
        return self.will()

    def subscriptions(self) -> list[str]:
        return [f"{self.base}/cmd"]

    def report(self) -> list[Message]:
        return [self.status()]

    def status(self, request_id: str | None = None) -> Message:
        # WiFi signal drifts a little, within what an indoor ESP32 sees.
        self.rssi = max(-90, min(-35, self.rssi + self.rng.randint(-2, 2)))
        body: dict[str, object] = {"deviceId": self.device_id, "power": self.power}
        if request_id:
            body["requestId"] = request_id
        body.update(
            rssi=self.rssi,
            uptime=int(self.uptime),
            fw=FIRMWARE,
            ip=self.ip,
            ts=iso_ms(self.clock()),
        )
        return self.msg(f"{self.base}/status", dumps(body), "status")

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            command = json.loads(payload)
        except ValueError:
            log.warning("%s: ignoring a command that is not JSON: %r", self.device_id, payload[:80])
            return
        if not isinstance(command, dict):
            log.warning("%s: ignoring a command that is not an object", self.device_id)
            return
        target = command.get("deviceId")
        if target is not None and target != self.device_id:
            log.warning("%s: ignoring a command addressed to %r", self.device_id, target)
            return
        action = str(command.get("action", "")).upper()
        if action not in ACTIONS:
            log.warning("%s: ignoring unknown action %r", self.device_id, command.get("action"))
            return
        if action == "TOGGLE":
            action = "OFF" if self.power == "ON" else "ON"
        self.power = action
        request_id = command.get("requestId")
        self.publish(self.status(request_id if isinstance(request_id, str) else None))
