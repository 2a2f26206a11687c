"""`meter-v2` (SPEC §4.3): DC and AC traction power meters speaking the v2 envelope.

Every message from the device except the status is an envelope
`{"v": 2, "seq", "msg_type", "ts", "boot_id", ...}`. `seq` starts at 1 on every boot and grows
by one per message; `boot_id` is new on every boot, so the platform can tell a reboot (seq
restarts, new boot_id) from a duplicate or a gap. The status topic carries no seq: its
"offline" value is the MQTT will, fixed at connect time, so it could not carry a current one.

    iot/{id}/hello        -> on every connect and every hello_interval: boot_id, fw_version, …
    iot/{id}/status       -> {"status": "online"|"offline"}, retained; offline is the will
    iot/{id}/telemetry    -> every interval: device_type + data {voltage, current, power, energy…}
    iot/{id}/command      <- {"v": 2, "command_id", "name", "params"}
    iot/{id}/command/ack  -> {"command_id", "status": "ok"|"error", "detail"}
    iot/{id}/ota/status   -> downloading (progress) → applying → done, then a reboot

Commands: `reboot`, `ota` {version, url?}, `set_interval` {interval_s}, `ping`. Anything else is
acknowledged with status "error". A command without a command_id cannot be acknowledged and is
dropped (logged).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from apps.devices.models import Profile

from .base import Message, SimDevice, dumps, iso_ms
from .electrics import AcMeter, DcTractionFeeder

log = logging.getLogger("iotplatform.simulator")

FIRMWARE = "2.4.1"
DC = "power_meter_dc"
AC = "power_meter_ac"


class MeterV2(SimDevice):
    profile = Profile.METER_V2

    def boot(self) -> None:
        super().boot()
        # rng-derived so that a seeded run is reproducible.
        self.boot_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.seq = 0
        self.last_hello = self.clock()
        if self.boots == 1:
            self.fw_version = FIRMWARE
            self.device_type = self.spec.device_type or self.rng.choice((DC, AC))
            self.model: DcTractionFeeder | AcMeter = (
                DcTractionFeeder(self.rng)
                if self.device_type == DC
                else AcMeter(self.rng, self.spec.phases)
            )
            self.sampled_at = self.clock()

    @property
    def base(self) -> str:
        return f"iot/{self.device_id}"

    def ts(self) -> str | int:
        now = self.clock()
        return int(now * 1000) if self.options.ts_format == "epoch_ms" else iso_ms(now)

    def envelope(self, msg_type: str, **fields: Any) -> bytes:
        self.seq += 1
        body = {"v": 2, "seq": self.seq, "msg_type": msg_type, "ts": self.ts()}
        body["boot_id"] = self.boot_id
        body.update(fields)
        return dumps(body)

    # --- lifecycle --------------------------------------------------------------------------
    def will(self) -> Message:
        return self.msg(f"{self.base}/status", dumps({"status": "offline"}), "lwt", retain=True)

    def online(self) -> list[Message]:
        status = dumps({"status": "online"})
        return [self.msg(f"{self.base}/status", status, "lwt", retain=True), self.hello()]

    def offline(self) -> Message:
        return self.will()

    def subscriptions(self) -> list[str]:
        return [f"{self.base}/command"]

    def hello(self) -> Message:
        self.last_hello = self.clock()
        payload = self.envelope(
            "hello",
            fw_version=self.fw_version,
            device_type=self.device_type,
            uptime_s=int(self.uptime),
            interval_s=self.interval,
        )
        return self.msg(f"{self.base}/hello", payload, "hello")

    def report(self) -> list[Message]:
        out = []
        every = self.options.hello_interval
        if every and self.clock() - self.last_hello >= every:
            out.append(self.hello())  # the heartbeat
        now = self.clock()
        data = self.model.step(now - self.sampled_at)
        self.sampled_at = now
        payload = self.envelope("telemetry", device_type=self.device_type, data=data)
        out.append(self.msg(f"{self.base}/telemetry", payload, "telemetry"))
        return out

    def skip_sequence(self, n: int) -> bool:
        self.seq += n
        return True

    # --- commands ---------------------------------------------------------------------------
    def ack(self, command_id: str, ok: bool, detail: str) -> None:
        payload = self.envelope(
            "command_ack", command_id=command_id, status="ok" if ok else "error", detail=detail
        )
        self.publish(self.msg(f"{self.base}/command/ack", payload, "ack"))

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            command = json.loads(payload)
        except ValueError:
            log.warning("%s: dropping a command that is not JSON: %r", self.device_id, payload[:80])
            return
        command_id = command.get("command_id") if isinstance(command, dict) else None
        if not isinstance(command_id, str) or not command_id:
            log.warning("%s: dropping a command without command_id", self.device_id)
            return
        if command.get("v") != 2:
            self.ack(command_id, False, f"unsupported envelope version {command.get('v')!r}")
            return
        params = command.get("params") or {}
        if not isinstance(params, dict):
            self.ack(command_id, False, "params must be an object")
            return
        name = command.get("name")
        handler = {
            "reboot": self._reboot,
            "ota": self._ota,
            "set_interval": self._set_interval,
            "ping": self._ping,
        }.get(name if isinstance(name, str) else "")
        if handler is None:
            self.ack(command_id, False, f"unknown command {name!r}")
            return
        handler(command_id, params)

    def _ping(self, command_id: str, params: dict[str, Any]) -> None:
        self.ack(command_id, True, "pong")

    def _set_interval(self, command_id: str, params: dict[str, Any]) -> None:
        value = params.get("interval_s")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0.05 <= value <= 86400
        ):
            self.ack(
                command_id, False, "params.interval_s must be a number of seconds in 0.05..86400"
            )
            return
        self.interval = float(value)
        self.ack(command_id, True, f"interval set to {self.interval:g} s")

    def _reboot(self, command_id: str, params: dict[str, Any]) -> None:
        self.ack(command_id, True, "rebooting")
        self._later(self.options.reboot_delay, lambda: self.host.reboot(self))

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        """Run `action` later unless the device has rebooted in between (steps of a
        firmware job die with the boot that started them)."""
        boot = self.boots

        def run() -> None:
            if self.boots == boot:
                action()

        self.host.call_later(delay, run)

    def _ota(self, command_id: str, params: dict[str, Any]) -> None:
        version = params.get("version")
        if not isinstance(version, str) or not version.strip():
            self.ack(command_id, False, "params.version is required")
            return
        if version == self.fw_version:
            self.ack(command_id, False, f"already running {version}")
            return
        self.ack(command_id, True, f"updating to {version}")
        # Simulator only: {"fail": true} makes the download fail half-way.
        steps: list[tuple[str, int | None]] = [("downloading", p) for p in (0, 25, 50, 75, 100)]
        if params.get("fail"):
            steps = [*steps[:3], ("failed", None)]
        else:
            steps += [("applying", None), ("done", None)]
        self._ota_step(steps, version)

    def _ota_step(self, steps: list[tuple[str, int | None]], version: str) -> None:
        state, progress = steps[0]
        fields: dict[str, Any] = {"state": state, "version": version}
        if progress is not None:
            fields["progress"] = progress
        self.publish(
            self.msg(f"{self.base}/ota/status", self.envelope("ota_status", **fields), "ota")
        )
        if len(steps) > 1:
            self._later(self.options.ota_step, lambda: self._ota_step(steps[1:], version))
        elif state == "done":
            self.fw_version = version  # the new image runs after the reboot
            self._later(self.options.reboot_delay, lambda: self.host.reboot(self))
