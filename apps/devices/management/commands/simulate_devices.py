"""`manage.py simulate_devices`: simulated devices of all three profiles on a real broker.

    # the devices of owner "demo", each on its own connection, at its expected interval
    manage.py simulate_devices --owner demo
    # 1,000 synthetic meters, 5,000 msg/s in total, QoS 1, one shared connection, 60 s
    manage.py simulate_devices --count 1000 --profile meter-v2 --rate 5000 --qos 1 \
        --shared-connection --duration 60

Stops on SIGTERM/SIGINT (a second signal skips waiting for unacknowledged messages), after
`--duration` or after `--messages` periodic messages, and prints a one-line summary.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.devices.models import TasmotaTopicOrder
from apps.devices.mqtt import mqtt_protocol
from apps.devices.simulator import (
    Broker,
    DeviceOptions,
    FaultInjector,
    RunOptions,
    Simulator,
    owner_specs,
    synthetic_specs,
)
from apps.devices.simulator.specs import METER_TYPES, PROFILES
from apps.owners.models import Owner


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError("must be between 0 and 1")
    return number


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


class Command(BaseCommand):
    help = "Simulate esp32-lamp, tasmota and meter-v2 devices against the MQTT broker."

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_argument_group("which devices (one of --owner / --count)")
        which.add_argument("--owner", metavar="SLUG", help="simulate this owner's devices")
        which.add_argument(
            "--device",
            action="append",
            default=[],
            metavar="ID",
            help="with --owner: only this device (repeatable)",
        )
        which.add_argument("--count", type=int, help="simulate N synthetic devices (no database)")
        which.add_argument(
            "--profile",
            choices=[*PROFILES, "mixed"],
            help="profile of the synthetic devices (default mixed); with --owner: a filter",
        )
        which.add_argument("--prefix", default="sim", help="synthetic device id prefix (sim)")
        which.add_argument("--relays", type=int, default=1, help="tasmota relays 1..8 (1)")
        which.add_argument(
            "--topic-order",
            choices=[o.value for o in TasmotaTopicOrder],
            default="prefix",
            help="tasmota FullTopic: prefix = cmnd/{topic}/…, topic = {topic}/cmnd/… (prefix)",
        )
        which.add_argument(
            "--meter-type",
            choices=[*METER_TYPES, "mixed"],
            default="mixed",
            help="meter-v2: dc (750 V traction), ac (3-phase), ac1 (single-phase), mixed",
        )

        how = parser.add_argument_group("traffic")
        how.add_argument("--url", help="broker URL (default: settings.MQTT_URL)")
        how.add_argument(
            "--interval",
            type=_positive,
            help="seconds between reports per device (default: the device's expected "
            "interval; 10 for synthetic devices)",
        )
        how.add_argument(
            "--rate",
            type=float,
            help="periodic messages per second over all devices; 0 = as fast as possible",
        )
        how.add_argument("--qos", type=int, choices=[0, 1], default=1, help="QoS of reports (1)")
        how.add_argument("--duration", type=_positive, help="stop after this many seconds")
        how.add_argument("--messages", type=int, help="stop after this many periodic messages")
        how.add_argument(
            "--shared-connection",
            action="store_true",
            help="all devices on one MQTT connection (benchmarks; no per-device wills)",
        )
        how.add_argument(
            "--abrupt",
            action="store_true",
            help="on stop, drop connections without DISCONNECT so the brokers fire the wills",
        )
        how.add_argument(
            "--protocol",
            choices=["3.1.1", "5"],
            help="MQTT version (default: settings.MQTT_PROTOCOL; the embedded broker has no 5)",
        )
        how.add_argument("--ca-file", help="CA bundle for mqtts:// brokers")
        how.add_argument("--max-inflight", type=int, default=100, help="QoS 1 window (100)")
        how.add_argument(
            "--connect-concurrency",
            type=int,
            default=1,
            metavar="N",
            help="MQTT handshakes in flight at once (1: safe with the embedded broker; "
            "raise it for Mosquitto and big fleets)",
        )
        how.add_argument("--json", action="store_true", help="print the summary as JSON")
        how.add_argument("--seed", type=int, help="make values and timing reproducible")

        behave = parser.add_argument_group("device behaviour and faults")
        behave.add_argument(
            "--hello-interval",
            type=float,
            default=60.0,
            help="meter-v2 heartbeat seconds; 0 = hello only on connect (60)",
        )
        behave.add_argument(
            "--ts-format", choices=["iso", "epoch_ms"], default="iso", help="meter-v2 ts format"
        )
        behave.add_argument("--ota-step", type=float, default=1.0, help="seconds per OTA step")
        behave.add_argument(
            "--reboot-delay", type=float, default=1.0, help="seconds from reboot ack to reboot"
        )
        behave.add_argument(
            "--duplicate-rate",
            type=_fraction,
            default=0.0,
            metavar="P",
            help="probability that a report is sent twice",
        )
        behave.add_argument(
            "--gap-rate",
            type=_fraction,
            default=0.0,
            metavar="P",
            help="probability that meter-v2 skips sequence numbers",
        )
        behave.add_argument(
            "--bad-rate",
            type=_fraction,
            default=0.0,
            metavar="P",
            help="probability that a report is replaced by a malformed payload",
        )

    def handle(self, *args: Any, **o: Any) -> None:
        if o["verbosity"] >= 2:
            logging.getLogger("iotplatform.simulator").setLevel(logging.DEBUG)
        specs = self._specs(o)
        try:
            broker = Broker.parse(o["url"] or settings.MQTT_URL)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if o["rate"] is not None and o["rate"] < 0:
            raise CommandError("--rate must be 0 (as fast as possible) or more")
        if o["messages"] is not None and o["messages"] < 1:
            raise CommandError("--messages must be at least 1")
        simulator = Simulator(
            specs,
            RunOptions(
                broker=broker,
                shared_connection=o["shared_connection"],
                protocol=(
                    mqtt_protocol()
                    if o["protocol"] is None
                    else mqtt.MQTTv5
                    if o["protocol"] == "5"
                    else mqtt.MQTTv311
                ),
                ca_file=o["ca_file"],
                max_inflight=o["max_inflight"],
                connect_concurrency=max(1, o["connect_concurrency"]),
                rate=o["rate"],
                duration=o["duration"],
                messages=o["messages"],
                abrupt=o["abrupt"],
            ),
            DeviceOptions(
                qos=o["qos"],
                ts_format=o["ts_format"],
                hello_interval=o["hello_interval"],
                ota_step=o["ota_step"],
                reboot_delay=o["reboot_delay"],
            ),
            FaultInjector(o["duplicate_rate"], o["gap_rate"], o["bad_rate"]),
            seed=o["seed"],
        )
        mode = "one shared connection" if o["shared_connection"] else "a connection per device"
        self.stderr.write(f"simulating {len(specs)} devices on {broker} over {mode}; Ctrl-C stops")
        with _stop_on_signals(simulator.request_stop):
            stats = simulator.run()
        self.stdout.write(json.dumps(stats.as_dict()) if o["json"] else stats.summary_line())
        if not stats.connects:
            # Exit non-zero so that a benchmark or a supervisor notices.
            raise CommandError(
                f"never connected to {broker} (is it running? does it speak MQTT "
                f"{o['protocol'] or settings.MQTT_PROTOCOL}? see the log above)"
            )

    def _specs(self, o: dict[str, Any]) -> list:
        if (o["owner"] is None) == (o["count"] is None):
            raise CommandError("give exactly one of --owner SLUG or --count N")
        try:
            if o["owner"] is not None:
                if not Owner.objects.filter(slug=o["owner"]).exists():
                    raise CommandError(f"no owner with slug {o['owner']!r}")
                specs = owner_specs(
                    o["owner"], device_ids=o["device"], profile=o["profile"], interval=o["interval"]
                )
                if not specs:
                    raise CommandError(f"owner {o['owner']!r} has no matching devices")
                return specs
            return synthetic_specs(
                o["count"],
                o["profile"] or "mixed",
                prefix=o["prefix"],
                interval=o["interval"] or 10.0,
                relays=o["relays"],
                topic_order=o["topic_order"],
                meter_type=o["meter_type"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc


@contextmanager
def _stop_on_signals(stop: Callable[..., None]) -> Iterator[None]:
    """First SIGINT/SIGTERM: stop cleanly. Second: stop without waiting for acknowledgements."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled on the main thread (e.g. call_command in a test)
        return
    seen = []

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        stop(force=len(seen) > 1)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
